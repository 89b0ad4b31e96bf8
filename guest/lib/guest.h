/* Shared definitions for the pyvmm toy guests (freestanding, x86-64). */
#pragma once
#include <stdint.h>
#include <stddef.h>
#include <stdarg.h>

typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;
typedef int64_t i64;

#define NORETURN __attribute__((noreturn))
#define PGT __attribute__((section(".pgt"), aligned(4096)))

/* ---- syscall ABI: ring 3 executes `ud2` with rax=nr, rdi/rsi/rdx = args; rax = result ---- */
#define SYS_EXIT  0   /* exit(code): outl(code, 0xf4) */
#define SYS_WRITE 1   /* write(buf, len) -> len, bytes go to COM1 */

static inline long syscall3(long n, long a, long b, long c)
{
    __asm__ __volatile__("ud2" : "+a"(n) : "D"(a), "S"(b), "d"(c) : "memory");
    return n;
}

/* ---- port IO (ring 0 only) ---- */
static inline void outb(u16 p, u8 v) { __asm__ __volatile__("outb %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ __volatile__("outl %0, %1" :: "a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cpu_relax(void) { __asm__ __volatile__("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ __volatile__("" ::: "memory"); }
static inline void mb(void) { __asm__ __volatile__("mfence" ::: "memory"); }

/* ---- string / formatting (usable in both rings) ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);
int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap);
int snprintf(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
u64 parse_u64(const char *s, size_t len, int *ok);   /* decimal / 0x hex, K/M/G suffix */

/* ---- cmdline (copied from start_info at boot; readable from ring 3) ---- */
extern char g_cmdline[1024];
/* value of `key=value` token (or "" for a bare `key`); *len = value length; NULL if absent */
const char *cmdline_get(const char *key, size_t *len);
u64 cmdline_u64(const char *key, u64 def);
int cmdline_is(const char *key, const char *val);   /* key=val present */

/* ---- memory map (copied from start_info) ---- */
struct memmap_entry { u64 addr, size; u32 type, reserved; };
#define MAX_MEMMAP 64
extern struct memmap_entry g_memmap[MAX_MEMMAP];
extern u32 g_memmap_n;
extern u64 g_mapped_top;       /* identity map covers [0, g_mapped_top) */
extern char _image_start[], _end[];

/* ---- time ---- */
extern u64 g_tsc_khz;          /* TSC frequency */
extern u64 g_boot_tsc;         /* TSC at the PVH entry */
static inline u64 tsc_to_us(u64 ticks) { return ticks * 1000 / g_tsc_khz; }
static inline u64 us_to_tsc(u64 us) { return us * g_tsc_khz / 1000; }

/* ---- ring 0 ---- */
/* the 64-bit TSS and an IDT gate (kernel.c's for the boot CPU; an SMP guest makes one per CPU) */
struct tss {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2, reserved1, ist[7], reserved2;
    u16 reserved3, iomap_base;
} __attribute__((packed));

struct idt_entry { u16 off0, sel; u8 ist, attr; u16 off1; u32 off2, zero; } __attribute__((packed));
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void serial_write(const char *s, size_t n);
int serial_getc(u64 us);
NORETURN void dbg_exit(u32 code);
/* iretq into fn(arg) at CPL 3 on the shared user stack; returning from fn == exit(0) */
NORETURN void enter_user(void (*fn)(void *), void *arg);
void guest_main(void);         /* provided by each guest; runs in ring 0 after setup */
/* a guest's own syscalls (nr > SYS_WRITE), in ring 0 with interrupts off; weak default: -ENOSYS */
long guest_syscall(u64 nr, u64 a, u64 b, u64 c);
extern u32 pvh_info_paddr;     /* the PVH start_info's address (boot.S) */

/* ---- ring 3 helpers ---- */
NORETURN void u_exit(int code);
long u_write(const void *buf, size_t len);
void uprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

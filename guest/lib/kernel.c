/* Ring-0 side: start_info parsing, serial, GDT/TSS/IDT, exceptions, syscall gate, TSC. */
#include "guest.h"

#define COM1 0x3f8
#define START_INFO_MAGIC 0x336ec578u

struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};

struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vec, err, rip, cs, rflags, rsp, ss;
};

char g_cmdline[1024] PGT;
struct memmap_entry g_memmap[MAX_MEMMAP] PGT;
u32 g_memmap_n;
u64 g_mapped_top = 1ull << 32;
u64 g_tsc_khz;

extern u64 gdt[];
extern u64 pdpt[];
extern const u64 isr_table[32];
extern char kstack_top[];

static struct tss tss;
static struct idt_entry idt[32] __attribute__((aligned(16)));
static u8 df_stack[4096] PGT;
/* page directories for RAM above 4 GiB (up to 64 GiB) */
static u64 pd_high[60][512] PGT;

/* ---------------- serial ---------------- */
/* Bytes written per "transmitter empty" (LSR.THRE) check: 16 on a 16550A, whose
 * transmit FIFO is empty when THRE is set, as Linux's 8250 driver fills it; 1 on a
 * UART without FIFOs.  Each check is a port-IO exit: a line written a byte at a
 * time costs twice the exits (a 45-byte heartbeat ~2.3 ms of ring-0 port I/O on a
 * PVM host), and a heartbeat that slow cannot show a pause shorter than a line. */
static int serial_burst = 1;

static void serial_init(void)
{
    outb(COM1 + 1, 0x00);   /* IER off */
    outb(COM1 + 3, 0x80);   /* DLAB */
    outb(COM1 + 0, 0x01);   /* 115200 */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);   /* 8N1 */
    outb(COM1 + 2, 0x07);   /* FIFO on, clear */
    outb(COM1 + 4, 0x03);   /* DTR|RTS */
    /* IIR's top bits read 11 once the FIFOs are on: a 16550A (8250 autoconfig) */
    serial_burst = (inb(COM1 + 2) & 0xc0) == 0xc0 ? 16 : 1;
}

static void serial_wait_thre(void)
{
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        ;
}

/* One byte from the serial line, or -1 if none arrives within `us` microseconds. */
int serial_getc(u64 us)
{
    u64 end = rdtsc() + us_to_tsc(us);
    while (rdtsc() < end)
        if (inb(COM1 + 5) & 0x01)
            return inb(COM1);
    return -1;
}

static void serial_send(const char *p, size_t n)
{
    __asm__ __volatile__("rep outsb" : "+S"(p), "+c"(n) : "d"((u16)COM1) : "memory");
}

/* `s`, with "\n" sent as "\r\n": up to serial_burst bytes after each THRE, sent
 * straight from `s` by one string instruction (this code is emulated instruction
 * by instruction on a PVM host: no copy, no per-byte loop but the newline scan);
 * then wait for the transmitter to empty, as Linux's serial console does at the
 * end of a write (with coalesced PIO that poll is also when the VMM writes the
 * bytes out). */
static void serial_put(const char *p, size_t k, size_t *room)
{
    while (k) {
        if (!*room) {
            serial_wait_thre();
            *room = (size_t)serial_burst;
        }
        size_t m = k < *room ? k : *room;
        serial_send(p, m);
        p += m;
        k -= m;
        *room -= m;
    }
}

void serial_write(const char *s, size_t n)
{
    static const char crlf[2] = {'\r', '\n'};
    const char *end = s + n;
    size_t room = 0;

    while (s < end) {
        const char *nl = s;
        while (nl < end && *nl != '\n')
            nl++;
        serial_put(s, (size_t)(nl - s), &room);
        if (nl == end)
            break;
        serial_put(crlf, 2, &room);
        s = nl + 1;
    }
    serial_wait_thre();
}

void kprintf(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 1)
        n = sizeof buf - 1;
    serial_write(buf, n);
}

NORETURN void dbg_exit(u32 code)
{
    outl(0xf4, code);
    for (;;)
        __asm__ __volatile__("cli; hlt");
}

/* ---------------- exceptions / syscall gate ---------------- */
static const char *const exc_names[32] = {
    "DE", "DB", "NMI", "BP", "OF", "BR", "UD", "NM", "DF", "CSO", "TS", "NP", "SS", "GP", "PF", "15",
    "MF", "AC", "MC", "XM", "VE", "CP", "22", "23", "24", "25", "26", "27", "HV", "VC", "SX", "31",
};

static u64 do_syscall(struct frame *f)
{
    switch (f->rax) {
    case SYS_EXIT:
        dbg_exit((u32)f->rdi);
    case SYS_WRITE: {
        size_t n = f->rsi;
        if (n > 65536)
            n = 65536;
        serial_write((const char *)f->rdi, n);
        return n;
    }
    default:
        return (u64)guest_syscall(f->rax, f->rdi, f->rsi, f->rdx);
    }
}

/* A guest's own system calls (numbers above SYS_WRITE); this default has none. */
__attribute__((weak)) long guest_syscall(u64 nr, u64 a, u64 b, u64 c)
{
    return -38;    /* -ENOSYS */
}

void exc_handler(struct frame *f)
{
    if (f->vec == 6 && (f->cs & 3) == 3) {
        const u8 *p = (const u8 *)f->rip;
        if (p[0] == 0x0f && p[1] == 0x0b) {
            f->rip += 2;
            f->rax = do_syscall(f);
            return;
        }
    }
    u64 cr2;
    __asm__ __volatile__("mov %%cr2, %0" : "=r"(cr2));
    kprintf("FAULT: #%s (vector %lu) err=0x%lx rip=0x%lx cr2=0x%lx ring=%lu\n",
            exc_names[f->vec & 31], f->vec, f->err, f->rip, cr2, f->cs & 3);
    dbg_exit(3);
}

static void cpu_tables_init(void)
{
    u64 base = (u64)&tss, limit = sizeof(tss) - 1;
    tss.rsp0 = (u64)kstack_top;
    tss.ist[0] = (u64)(df_stack + sizeof df_stack);
    tss.iomap_base = sizeof(tss);
    gdt[5] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
             (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt[6] = base >> 32;
    __asm__ __volatile__("ltr %w0" :: "r"(0x28));
    for (int i = 0; i < 32; i++) {
        u64 h = isr_table[i];
        idt[i].off0 = h & 0xffff;
        idt[i].sel = 0x08;
        idt[i].ist = (i == 8) ? 1 : 0;
        idt[i].attr = 0x8e;
        idt[i].off1 = (h >> 16) & 0xffff;
        idt[i].off2 = h >> 32;
        idt[i].zero = 0;
    }
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
    __asm__ __volatile__("lidt %0" :: "m"(idtr));
}

/* map RAM above 4 GiB (2 MiB pages, up to 64 GiB) */
static void map_high(void)
{
    u64 top = 1ull << 32;
    for (u32 i = 0; i < g_memmap_n; i++)
        if (g_memmap[i].type == 1 && g_memmap[i].addr + g_memmap[i].size > top)
            top = g_memmap[i].addr + g_memmap[i].size;
    if (top > (64ull << 30))
        top = 64ull << 30;
    u64 gib = (top + (1ull << 30) - 1) >> 30;
    for (u64 g = 4; g < gib; g++) {
        u64 *pd = pd_high[g - 4];
        for (u64 j = 0; j < 512; j++)
            pd[j] = ((g << 30) + (j << 21)) | 0x87;
        pdpt[g] = (u64)pd | 7;
    }
    if (gib > 4) {
        g_mapped_top = gib << 30;
        __asm__ __volatile__("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
    }
}

/* ---------------- TSC frequency ---------------- */
static void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ __volatile__("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static u16 pit0_read(void)
{
    outb(0x43, 0x00);
    u8 lo = inb(0x40);
    return lo | (u16)inb(0x40) << 8;
}

static void tsc_init(void)
{
    const char *src = "cmdline";
    u32 a, b, c, d;
    g_tsc_khz = cmdline_u64("tsc_khz", 0);
    if (!g_tsc_khz) {
        cpuid(0x40000000, &a, &b, &c, &d);
        if (a >= 0x40000010 && a < 0x40010000) {
            cpuid(0x40000010, &a, &b, &c, &d);
            if (a) {
                g_tsc_khz = a;
                src = "cpuid";
            }
        }
    }
    if (!g_tsc_khz && inb(0x61) != 0xff) {
        /* PIT channel 2 gated by port 0x61, mode 0, ~10 ms */
        u8 v = inb(0x61);
        outb(0x61, (v & ~0x02) | 0x01);
        outb(0x43, 0xb0);
        outb(0x42, 11932 & 0xff);
        outb(0x42, 11932 >> 8);
        u64 t0 = rdtsc(), t1;
        int ok = 0;
        for (long i = 0; i < 2000000; i++)
            if (inb(0x61) & 0x20) { ok = 1; break; }
        t1 = rdtsc();
        if (ok && t1 - t0 > 100000) {
            g_tsc_khz = (t1 - t0) * 1193182 / 11932 / 1000;
            src = "pit";
        }
    }
    if (!g_tsc_khz) {
        /* no port 0x61 (e.g. QEMU microvm): PIT channel 0, mode 2, latched reads */
        outb(0x43, 0x34);
        outb(0x40, 0);
        outb(0x40, 0);
        u16 c0 = pit0_read(), c;
        u64 t0 = rdtsc(), t1 = t0;
        u32 elapsed = 0;
        for (long i = 0; i < 2000000 && elapsed < 11932; i++) {
            c = pit0_read();
            elapsed = (u16)(c0 - c);
            t1 = rdtsc();
        }
        if (elapsed >= 11932 && elapsed < 30000 && t1 - t0 > 100000) {
            g_tsc_khz = (t1 - t0) * 1193182 / elapsed / 1000;
            src = "pit";
        }
    }
    if (!g_tsc_khz) {
        g_tsc_khz = 2000000;
        src = "default";
    }
    kprintf("tsc: %lu kHz (%s)\n", g_tsc_khz, src);
}

/* ---------------- entry ---------------- */
extern u64 g_t64;
u64 g_stamp[8];
void kmain(u32 info_paddr)
{
    g_stamp[0] = rdtsc();
    const struct hvm_start_info *si = (const struct hvm_start_info *)(u64)info_paddr;
    int have_si = si && si->magic == START_INFO_MAGIC;
    g_cmdline[0] = 0;
    if (have_si) {
        if (si->cmdline_paddr) {
            const char *s = (const char *)si->cmdline_paddr;
            size_t i = 0;
            for (; i < sizeof g_cmdline - 1 && s[i]; i++)
                g_cmdline[i] = s[i];
            g_cmdline[i] = 0;
        }
        if (si->version >= 1 && si->memmap_paddr) {
            const struct memmap_entry *m = (const struct memmap_entry *)si->memmap_paddr;
            u32 n = si->memmap_entries < MAX_MEMMAP ? si->memmap_entries : MAX_MEMMAP;
            for (u32 i = 0; i < n; i++)
                g_memmap[i] = m[i];
            g_memmap_n = n;
        }
    }
    g_stamp[1] = rdtsc();
    serial_init();
    g_stamp[2] = rdtsc();
    if (!have_si)
        kprintf("warning: no PVH start_info\n");
    cpu_tables_init();
    g_stamp[3] = rdtsc();
    tsc_init();
    g_stamp[4] = rdtsc();
    map_high();
    g_stamp[5] = rdtsc();
    if (cmdline_get("boottrace", 0))
        kprintf("boottrace: start64=%lu bss=%lu si=%lu serial=%lu tables=%lu tsc=%lu map=%lu us\n",
                tsc_to_us(g_t64 - g_boot_tsc), tsc_to_us(g_stamp[0] - g_t64), tsc_to_us(g_stamp[1] - g_stamp[0]),
                tsc_to_us(g_stamp[2] - g_stamp[1]), tsc_to_us(g_stamp[3] - g_stamp[2]),
                tsc_to_us(g_stamp[4] - g_stamp[3]), tsc_to_us(g_stamp[5] - g_stamp[4]));
    g_stamp[6] = rdtsc();
    guest_main();
    dbg_exit(0);
}

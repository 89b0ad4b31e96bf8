/* smp: every vCPU works in ring 3, they send each other IPIs, and they check one clock.
 *
 * Bring-up as a real kernel does it: the boot CPU finds the CPUs in the ACPI MADT
 * (the RSDP from the PVH start_info, else by scanning 0xe0000-0xfffff; without ACPI,
 * cmdline cpus=N with APIC IDs 0..N-1) and starts each AP with INIT-SIPI-SIPI through
 * its local APIC (xAPIC MMIO at 0xfee00000).  The AP runs a trampoline copied to
 * TRAMP (0x9000, SIPI vector 0x09) that goes from real mode straight to long mode
 * on the boot CPU's page tables, then loads its own GDT, TSS and the shared IDT.
 *
 * Then every CPU, in ring 3 with interrupts on:
 *  - counts its own work and adds to a shared atomic counter;
 *  - every ipi_us (default 2000) sends a fixed IPI to the next other CPU, vector
 *    0x40 + its own index so the receiver knows the sender; to one CPU it sends
 *    the next only once the last one was received (an IPI to a vector still pending
 *    would merge with it), so none can be lost or doubled unnoticed;
 *  - before each rdtsc reads what the others last published and counts it if its
 *    own TSC is behind (tsc_back) -- a cross-CPU clock regression;
 *  - every beat_ms (default 500) prints one heartbeat line:
 *      "cpu <i> beat <n> work=<w> shared=<s> sent=<s> recv=<r> tsc_back=<b>"
 * With sleepers=K the last K CPUs (at most all but CPU 0) instead halt in ring 0 and
 * only CPU 0 wakes them, one IPI every wake_ms (default 1000) to each in turn; a
 * sleeper prints "cpu <i> woke <n>" each time.
 * A 'c' on the serial line (CPU 0 reads it at its heartbeat) is a check: the CPUs stop
 * sending, wait for what is in flight, CPU 0 prints "smp: check cpus=<n> sent=<s>
 * recv=<r> tsc_back=<b> shared=<ok|bad> tsc_worst=<cycles>" (shared: the shared
 * counter equals the sum of the CPUs' own; tsc_worst: the largest regression seen)
 * and they go on.  A 'q' does the same, prints "smp: done ..." and exits 0 if every
 * IPI sent was received once, no TSC went back by more than tsc_slack cycles (default
 * 0: not at all) and the counters agree (else exit 1).  tsc_slack is for hosts whose
 * own CPUs' TSCs are a few cycles apart (the guest reads the host's TSC).  A doubled IPI ends it at once: "smp: doubled ..." exit 4.
 * maxcpus=N starts only the first N CPUs: the others stay waiting for their SIPI.
 */
#include "guest.h"

#define MAX_CPUS 16
#define TRAMP 0x9000u              /* the AP start-up page: SIPI vector TRAMP >> 12 */
#define LAPIC 0xfee00000u
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define IPI_VECTOR 0x40            /* + the sender's index */
#define SPURIOUS 0xff
#define SYS_IPI 2                  /* ipi(apic id, vector) */
#define SYS_GETC 3                 /* a byte from the serial line, or -1 */
#define COM1 0x3f8

struct cpu {
    u32 apic_id, index;
    volatile u32 online, acked;    /* acked: the last check (epoch) it drained for */
    volatile u64 work, beats, wakes;
    volatile u64 sent[MAX_CPUS];   /* to CPU j */
    volatile u64 recv[MAX_CPUS];   /* from CPU i */
    volatile u64 published;        /* its TSC, last read */
    volatile u64 tsc_back, unexpected;
    volatile u64 back_worst;       /* the largest regression seen, in TSC cycles */
} __attribute__((aligned(64)));

static struct cpu cpus[MAX_CPUS];
static u32 ncpus = 1, sleeper = MAX_CPUS;   /* sleeper: the first halting CPU's index */
static volatile u64 shared;
static u64 tsc_slack;        /* cycles of cross-CPU regression still counted as "no regression" */
static volatile u32 epoch, released, ending, doubled, out_lock;
static u64 gdts[MAX_CPUS][8] __attribute__((aligned(16)));
static struct tss tsss[MAX_CPUS];
static struct idt_entry idt[256] __attribute__((aligned(16)));
static u8 kstacks[MAX_CPUS][16384] PGT;
static u8 ustacks[MAX_CPUS][16384] PGT;
static u8 dfstacks[MAX_CPUS][4096] PGT;
u64 ap_stack;                      /* the starting AP's kernel stack (ap_entry64 loads it) */

extern u64 gdt[];
extern u64 pml4[];
extern const u64 isr_table[32];
extern char tramp_start[], tramp_end[], tr_cr3[], tr_entry[], ipi_stubs[], spurious_stub[];
void ap_entry64(void);
NORETURN void enter_user_on(void (*fn)(void *), void *arg, u64 stack_top);

/* The AP trampoline, run at TRAMP (position-dependent: every address is TRAMP + offset).
 * Real mode -> long mode in one step (CR0.PE and CR0.PG together) on a GDT of its own. */
__asm__(
    ".pushsection .rodata\n"
    ".code16\n"
    ".globl tramp_start, tramp_end, tr_cr3, tr_entry\n"
    "tramp_start:\n"
    "  cli\n"
    "  cld\n"
    "  movw %cs, %ax\n"
    "  movw %ax, %ds\n"
    "  lgdtl %ds:(tr_gdtr - tramp_start)\n"
    "  movl $0x20, %eax\n"                     /* CR4.PAE */
    "  movl %eax, %cr4\n"
    "  movl %ds:(tr_cr3 - tramp_start), %eax\n"
    "  movl %eax, %cr3\n"
    "  movl $0xC0000080, %ecx\n"               /* EFER.LME */
    "  rdmsr\n"
    "  orl $0x100, %eax\n"
    "  wrmsr\n"
    "  movl $0x80000011, %eax\n"               /* PG | ET | PE */
    "  movl %eax, %cr0\n"
    "  ljmpl $0x08, $(tr_long - tramp_start + 0x9000)\n"
    ".code64\n"
    "tr_long:\n"
    "  movl $0x10, %eax\n"
    "  movl %eax, %ds\n"
    "  movl %eax, %es\n"
    "  movl %eax, %ss\n"
    "  movq (tr_entry - tramp_start + 0x9000), %rax\n"
    "  jmp *%rax\n"
    "  .balign 8\n"
    "tr_gdt:\n"
    "  .quad 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF\n"
    "tr_gdtr:\n"
    "  .word 23\n"
    "  .long tr_gdt - tramp_start + 0x9000\n"
    "  .balign 8\n"
    "tr_cr3: .long 0, 0\n"
    "tr_entry: .quad 0\n"
    "tramp_end:\n"
    ".popsection\n"
    /* 64-bit, on the boot page tables: the AP's own stack, then C */
    ".text\n"
    ".globl ap_entry64\n"
    "ap_entry64:\n"
    "  movq ap_stack(%rip), %rsp\n"
    "  xorl %eax, %eax\n"
    "  movl %eax, %fs\n"
    "  movl %eax, %gs\n"
    "  call ap_main\n"
    "1: hlt\n"
    "  jmp 1b\n"
    /* enter_user_on(fn, arg, stack_top): iretq to fn(arg) in ring 3, interrupts on */
    ".globl enter_user_on\n"
    "enter_user_on:\n"
    "  subq $8, %rdx\n"
    "  movq $0, (%rdx)\n"
    "  pushq $0x23\n"
    "  pushq %rdx\n"
    "  pushq $0x202\n"
    "  pushq $0x1b\n"
    "  pushq %rdi\n"
    "  movq %rsi, %rdi\n"
    "  iretq\n"
    /* interrupt stubs: 0x40+i for sender i, then one for everything else */
    "  .balign 16\n"
    ".globl ipi_stubs, spurious_stub\n"
    "ipi_stubs:\n"
    "  .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n"
    "  .balign 16\n"
    "  pushq $\\n\n"
    "  jmp irq_common\n"
    "  .endr\n"
    "  .balign 16\n"
    "spurious_stub:\n"
    "  pushq $-1\n"
    "  jmp irq_common\n"
    "irq_common:\n"
    "  pushq %rax\n  pushq %rcx\n  pushq %rdx\n  pushq %rsi\n  pushq %rdi\n"
    "  pushq %r8\n  pushq %r9\n  pushq %r10\n  pushq %r11\n"
    "  movq 72(%rsp), %rdi\n"
    "  subq $8, %rsp\n"
    "  cld\n"
    "  call irq_handler\n"
    "  addq $8, %rsp\n"
    "  popq %r11\n  popq %r10\n  popq %r9\n  popq %r8\n"
    "  popq %rdi\n  popq %rsi\n  popq %rdx\n  popq %rcx\n  popq %rax\n"
    "  addq $8, %rsp\n"
    "  iretq\n");

static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(u64)(LAPIC + reg); }
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(u64)(LAPIC + reg) = v; }
static inline u64 rdtsc_ordered(void) { __asm__ __volatile__("lfence" ::: "memory"); return rdtsc(); }

static void delay_us(u64 us)
{
    u64 end = rdtsc() + us_to_tsc(us);
    while (rdtsc() < end)
        cpu_relax();
}

static struct cpu *this_cpu(void)
{
    u32 id = lapic_read(LAPIC_ID) >> 24;
    for (u32 i = 0; i < ncpus; i++)
        if (cpus[i].apic_id == id)
            return &cpus[i];
    return &cpus[0];
}

/* ---------------- ring 0: interrupts, syscalls, per-CPU tables ---------------- */
void irq_handler(i64 sender)
{
    struct cpu *me = this_cpu();
    if (sender >= 0 && sender < MAX_CPUS) {
        u64 n = ++me->recv[sender];
        if (n > cpus[sender].sent[me->index])
            doubled = 1;
        if (me->index >= sleeper)
            me->wakes++;
        lapic_write(LAPIC_EOI, 0);
    } else {
        me->unexpected++;
    }
}

long guest_syscall(u64 nr, u64 a, u64 b, u64 c)
{
    switch (nr) {
    case SYS_IPI:
        lapic_write(LAPIC_ICR_HI, (u32)a << 24);
        lapic_write(LAPIC_ICR_LO, 0x4000 | (u32)(b & 0xff));   /* fixed, assert */
        return 0;
    case SYS_GETC:
        return (inb(COM1 + 5) & 1) ? inb(COM1) : -1;
    default:
        return -38;
    }
}

static void set_gate(int vec, u64 h)
{
    idt[vec] = (struct idt_entry){ h & 0xffff, 0x08, vec == 8 ? 1 : 0, 0x8e, (h >> 16) & 0xffff,
                                   h >> 32, 0 };
}

static void idt_init(void)
{
    for (int i = 0; i < 32; i++)
        set_gate(i, isr_table[i]);
    for (int i = 32; i < 256; i++)
        set_gate(i, (u64)spurious_stub);
    for (int i = 0; i < MAX_CPUS; i++)
        set_gate(IPI_VECTOR + i, (u64)ipi_stubs + 16 * i);
}

/* This CPU's GDT (the boot one's segments and its own TSS), the shared IDT, its LAPIC on. */
static void cpu_init(struct cpu *c)
{
    u32 i = c->index;
    struct tss *t = &tsss[i];
    u64 base = (u64)t, limit = sizeof *t - 1;
    t->rsp0 = (u64)kstacks[i] + sizeof kstacks[i];
    t->ist[0] = (u64)dfstacks[i] + sizeof dfstacks[i];
    t->iomap_base = sizeof *t;
    for (int k = 0; k < 5; k++)
        gdts[i][k] = gdt[k];
    gdts[i][5] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
                 (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdts[i][6] = base >> 32;
    struct { u16 limit; u64 base; } __attribute__((packed)) gdtr = { 7 * 8 - 1, (u64)gdts[i] },
        idtr = { sizeof idt - 1, (u64)idt };
    __asm__ __volatile__("lgdt %0" :: "m"(gdtr));
    __asm__ __volatile__("movl $0x10, %%eax; movl %%eax, %%ds; movl %%eax, %%es; movl %%eax, %%ss"
                         ::: "rax");
    __asm__ __volatile__("ltr %w0" :: "r"(0x28));
    __asm__ __volatile__("lidt %0" :: "m"(idtr));
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS);
}

/* ---------------- ring 3: the work ---------------- */
static void lock(void) { while (__atomic_exchange_n(&out_lock, 1, __ATOMIC_ACQUIRE)) cpu_relax(); }
static void unlock(void) { __atomic_store_n(&out_lock, 0, __ATOMIC_RELEASE); }

static u64 sum_sent(const struct cpu *c)
{
    u64 s = 0;
    for (u32 j = 0; j < ncpus; j++)
        s += c->sent[j];
    return s;
}

static u64 sum_recv(const struct cpu *c)
{
    u64 s = 0;
    for (u32 j = 0; j < ncpus; j++)
        s += c->recv[j];
    return s;
}

/* Read the others' published TSCs, then (ordered after) our own: ours must not be behind. */
static u64 check_clock(struct cpu *me)
{
    u64 newest = 0;
    for (u32 j = 0; j < ncpus; j++) {
        u64 p = cpus[j].published;
        if (j != me->index && p > newest)
            newest = p;
    }
    u64 now = rdtsc_ordered();
    if (now < newest) {
        me->tsc_back++;
        if (newest - now > me->back_worst)
            me->back_worst = newest - now;
    }
    me->published = now;
    return now;
}

/* Only to a CPU that is up (one still waiting for its SIPI drops fixed IPIs) and
 * has taken our last one. */
static int can_send(struct cpu *me, u32 to)
{
    return cpus[to].online && me->sent[to] == cpus[to].recv[me->index];
}

static void send_ipi(struct cpu *me, u32 to)
{
    me->sent[to]++;                /* before the IPI: the receiver checks recv <= sent */
    syscall3(SYS_IPI, cpus[to].apic_id, IPI_VECTOR + me->index, 0);
}

/* CPU 0, once every sending CPU has drained for this epoch: the totals, and the end. */
static void report(void)
{
    u64 sent = 0, recv = 0, back = 0, work = 0, worst = 0;
    for (u32 i = 0; i < ncpus; i++)
        while (i < sleeper && cpus[i].acked != epoch)
            cpu_relax();
    for (u32 i = 0; i < ncpus; i++) {
        sent += sum_sent(&cpus[i]);
        recv += sum_recv(&cpus[i]);
        back += cpus[i].tsc_back;
        if (cpus[i].back_worst > worst)
            worst = cpus[i].back_worst;
        work += cpus[i].work;
    }
    int ok = sent == recv && worst <= tsc_slack && !doubled;
    lock();
    for (u32 i = 0; i < ncpus; i++)
        for (u32 j = 0; j < ncpus; j++)
            if (cpus[i].sent[j] != cpus[j].recv[i])
                uprintf("smp: lost: cpu %u sent cpu %u %lu IPIs, it received %lu\n", i, j,
                        cpus[i].sent[j], cpus[j].recv[i]);
    uprintf("smp: %s cpus=%u sent=%lu recv=%lu tsc_back=%lu shared=%s tsc_worst=%lu\n",
            ending ? "done" : "check", ncpus, sent, recv, back, shared == work ? "ok" : "bad",
            worst);
    unlock();
    if (ending)
        u_exit(ok && shared == work ? 0 : 1);
    released = epoch;
}

/* A check ('c' on the serial line) or the end ('q'): stop sending, let what is in
 * flight arrive, and (CPU 0) count; the others wait until CPU 0 lets them go on. */
static void drain(struct cpu *me, u64 now)
{
    u32 e = epoch;
    for (u32 j = 0; j < ncpus; j++)
        for (u64 end = now + us_to_tsc(10000000);   /* 10 s: the host may be oversubscribed */
             me->sent[j] != cpus[j].recv[me->index] && rdtsc() < end;)
            cpu_relax();
    me->acked = e;
    if (me->index == 0)
        report();
    while (released != e)
        cpu_relax();
}

static void user_main(void *arg)
{
    struct cpu *me = arg;
    u64 ipi_period = us_to_tsc(cmdline_u64("ipi_us", 2000));
    u64 beat_period = us_to_tsc(cmdline_u64("beat_ms", 500) * 1000);
    u64 wake_period = us_to_tsc(cmdline_u64("wake_ms", 1000) * 1000);
    u64 now = check_clock(me), next_ipi = now + ipi_period, next_beat = now + beat_period;
    u64 next_wake = now + wake_period;
    u32 to = me->index, wake = ncpus;
    char buf[160];
    for (;;) {
        me->work++;
        __atomic_fetch_add(&shared, 1, __ATOMIC_RELAXED);
        now = check_clock(me);
        if (doubled) {
            lock();
            uprintf("smp: doubled IPI seen (cpu %u)\n", me->index);
            u_exit(4);
        }
        if (epoch != me->acked) {
            drain(me, now);
            now = check_clock(me);
        }
        if ((i64)(now - next_ipi) >= 0 && ncpus > 1) {
            for (u32 tries = 0; tries < ncpus; tries++) {   /* the next other CPU that is ready */
                to = (to + 1) % ncpus;
                if (to != me->index && to < sleeper && can_send(me, to)) {
                    send_ipi(me, to);
                    break;
                }
            }
            next_ipi += ipi_period;
            if ((i64)(now - next_ipi) >= 0)   /* fell behind (a pause): don't burst */
                next_ipi = now + ipi_period;
        }
        if (me->index == 0 && sleeper < ncpus && (i64)(now - next_wake) >= 0) {
            wake = wake + 1 < ncpus && wake + 1 >= sleeper ? wake + 1 : sleeper;
            if (can_send(me, wake))
                send_ipi(me, wake);
            next_wake = now + wake_period;
        }
        if ((i64)(now - next_beat) >= 0) {
            me->beats++;
            int len = snprintf(buf, sizeof buf,
                               "cpu %u beat %lu work=%lu shared=%lu sent=%lu recv=%lu tsc_back=%lu\n",
                               me->index, me->beats, me->work, shared, sum_sent(me),
                               sum_recv(me), me->tsc_back);
            lock();
            u_write(buf, len);
            unlock();
            long ch = me->index == 0 ? syscall3(SYS_GETC, 0, 0, 0) : -1;
            if (ch == 'q' || ch == 'c') {
                ending = ch == 'q';
                epoch++;
            }
            next_beat += beat_period;
            if ((i64)(now - next_beat) >= 0)
                next_beat = now + beat_period;
        }
    }
}

/* The sleeper: halted in ring 0 until an IPI comes. */
static NORETURN void sleep_loop(struct cpu *me)
{
    u64 seen = 0;
    for (;;) {
        __asm__ __volatile__("sti; hlt; cli" ::: "memory");
        if (me->wakes != seen) {
            seen = me->wakes;
            lock();
            kprintf("cpu %u woke %lu\n", me->index, seen);
            unlock();
        }
    }
}

static NORETURN void run_cpu(struct cpu *me)
{
    if (me->index >= sleeper)
        sleep_loop(me);
    enter_user_on(user_main, me, (u64)ustacks[me->index] + sizeof ustacks[me->index]);
}

void ap_main(void)
{
    struct cpu *me = this_cpu();
    cpu_init(me);
    me->online = 1;
    run_cpu(me);
}

/* ---------------- the boot CPU: ACPI, then INIT-SIPI-SIPI ---------------- */
struct sdt { char sig[4]; u32 len; u8 rev, sum; char oem[6], table[8]; u32 oemrev, creator, crev; }
    __attribute__((packed));

static int sum_ok(const void *p, u32 n)
{
    u8 s = 0;
    for (u32 i = 0; i < n; i++)
        s += ((const u8 *)p)[i];
    return s == 0;
}

static const u8 *find_rsdp(const char **how)
{
    const u32 *si = (const u32 *)(u64)pvh_info_paddr;
    u64 rsdp = si ? *(const u64 *)(si + 8) : 0;     /* start_info.rsdp_paddr */
    *how = "start_info";
    if (rsdp && !memcmp((const void *)rsdp, "RSD PTR ", 8) && sum_ok((const void *)rsdp, 20))
        return (const u8 *)rsdp;
    *how = "scan";
    for (u64 a = 0xe0000; a < 0x100000; a += 16)
        if (!memcmp((const void *)a, "RSD PTR ", 8) && sum_ok((const void *)a, 20))
            return (const u8 *)a;
    return 0;
}

static const struct sdt *find_madt(const u8 *rsdp)
{
    u8 rev = rsdp[15];
    u64 xsdt = rev >= 2 ? *(const u64 *)(rsdp + 24) : 0;
    const struct sdt *root = (const struct sdt *)(xsdt ? xsdt : *(const u32 *)(rsdp + 16));
    u32 entry = xsdt ? 8 : 4;
    if (!sum_ok(root, root->len))
        return 0;
    for (u32 off = sizeof *root; off + entry <= root->len; off += entry) {
        const u8 *p = (const u8 *)root + off;
        const struct sdt *t = (const struct sdt *)(entry == 8 ? *(const u64 *)p : *(const u32 *)p);
        if (!memcmp(t->sig, "APIC", 4) && sum_ok(t, t->len))
            return t;
    }
    return 0;
}

/* The enabled CPUs' APIC IDs: from the MADT, else cmdline cpus=N (IDs 0..N-1). */
static void find_cpus(void)
{
    const char *how;
    const u8 *rsdp = find_rsdp(&how);
    const struct sdt *madt = rsdp ? find_madt(rsdp) : 0;
    ncpus = 0;
    if (madt) {
        const u8 *p = (const u8 *)madt + sizeof *madt + 8, *end = (const u8 *)madt + madt->len;
        for (; p + 2 <= end && p[1] >= 2; p += p[1]) {
            u32 id, flags;
            if (p[0] == 0) {                       /* Processor Local APIC */
                id = p[3];
                flags = *(const u32 *)(p + 4);
            } else if (p[0] == 9) {                /* Processor Local x2APIC */
                id = *(const u32 *)(p + 4);
                flags = *(const u32 *)(p + 8);
            } else {
                continue;
            }
            if ((flags & 1) && ncpus < MAX_CPUS)
                cpus[ncpus++].apic_id = id;
        }
        kprintf("smp: ACPI MADT (RSDP at %p by %s): %u CPUs\n", rsdp, how, ncpus);
    }
    if (!ncpus) {
        ncpus = (u32)cmdline_u64("cpus", 1);
        if (ncpus < 1 || ncpus > MAX_CPUS)
            ncpus = 1;
        for (u32 i = 0; i < ncpus; i++)
            cpus[i].apic_id = i;
        kprintf("smp: no ACPI MADT: %u CPUs from the command line\n", ncpus);
    }
    for (u32 i = 0; i < ncpus; i++)
        cpus[i].index = i;
}

static void send_icr(u32 apic_id, u32 low)
{
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, low);
}

static int start_ap(struct cpu *c)
{
    ap_stack = (u64)kstacks[c->index] + sizeof kstacks[c->index];
    mb();
    send_icr(c->apic_id, 0x4500);                  /* INIT, assert */
    delay_us(10000);
    for (int i = 0; i < 2 && !c->online; i++) {
        send_icr(c->apic_id, 0x4600 | (TRAMP >> 12));   /* STARTUP (twice, as the MP spec says) */
        for (u64 end = rdtsc() + us_to_tsc(200); !c->online && rdtsc() < end;)
            cpu_relax();
    }
    for (u64 end = rdtsc() + us_to_tsc(2000000); !c->online && rdtsc() < end;)
        cpu_relax();
    return c->online;
}

void guest_main(void)
{
    outb(0x21, 0xff);                              /* the 8259s: all masked */
    outb(0xa1, 0xff);
    find_cpus();
    u64 max = cmdline_u64("maxcpus", MAX_CPUS);
    if (max >= 1 && max < ncpus) {             /* the rest stay waiting for their SIPI */
        kprintf("smp: using %lu of %u CPUs\n", max, ncpus);
        ncpus = (u32)max;
    }
    u32 me_id = lapic_read(LAPIC_ID) >> 24;
    if (cpus[0].apic_id != me_id) {                /* the boot CPU is index 0 */
        for (u32 i = 1; i < ncpus; i++)
            if (cpus[i].apic_id == me_id) {
                cpus[i].apic_id = cpus[0].apic_id;
                cpus[0].apic_id = me_id;
            }
    }
    u64 sleepers = cmdline_u64("sleepers", 0);
    if (sleepers)
        sleeper = sleepers < ncpus ? ncpus - (u32)sleepers : 1;
    idt_init();
    cpu_init(&cpus[0]);
    cpus[0].online = 1;
    memcpy((void *)(u64)TRAMP, tramp_start, tramp_end - tramp_start);
    *(u32 *)(TRAMP + (tr_cr3 - tramp_start)) = (u32)(u64)pml4;
    *(u64 *)(TRAMP + (tr_entry - tramp_start)) = (u64)ap_entry64;
    u32 up = 1;
    for (u32 i = 1; i < ncpus; i++) {
        if (!start_ap(&cpus[i])) {
            lock();
            kprintf("smp: cpu %u (APIC ID %u) did not start\n", i, cpus[i].apic_id);
            dbg_exit(2);
        }
        up++;
    }
    tsc_slack = cmdline_u64("tsc_slack", 0);
    lock();                                        /* the APs print already */
    kprintf("smp: %u CPUs online (INIT-SIPI), ipi_us=%lu beat_ms=%lu%s\n", up,
            cmdline_u64("ipi_us", 2000), cmdline_u64("beat_ms", 500),
            sleeper < ncpus ? " sleepers" : "");
    unlock();
    run_cpu(&cpus[0]);
}

/* hello: greeting, cmdline, ring-3 round trip through the ud2 gate, optional fault modes. */
#include "guest.h"

static void user_main(void *arg)
{
    uprintf("ring3: ok\n");
    if (cmdline_is("fault", "pf")) {
        volatile u64 *p = (volatile u64 *)0x4000000000ull;   /* 256 GiB: never mapped */
        (void)*p;
    } else if (cmdline_is("fault", "gp")) {
        __asm__ __volatile__("cli");
    } else if (cmdline_is("fault", "de")) {
        u32 zero = 0;
        __asm__ __volatile__("xorl %%edx, %%edx; movl $1, %%eax; divl %0" : : "r"(zero) : "eax", "edx");
    }
    u_exit(0);
}

void guest_main(void)
{
    kprintf("Hello from pyvmm toy guest\n");
    kprintf("cmdline: %s\n", g_cmdline);
    if (cmdline_is("fault", "ud")) {
        __asm__ __volatile__("ud2");
    } else if (cmdline_is("fault", "triple")) {
        struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { 0, 0 };
        __asm__ __volatile__("lidt %0; ud2" :: "m"(idtr));
    }
    /* echo_input=1: read one line from the serial port (the VMM's stdin) and print it. */
    if (cmdline_u64("echo_input", 0)) {
        char line[128];
        int n = 0, c;
        while (n < (int)sizeof line - 1 && (c = serial_getc(5000000)) >= 0 && c != '\n')
            line[n++] = (char)c;
        line[n] = 0;
        kprintf("input: %s\n", line);
    }
    /* bench_pio=N: N port-IO writes from ring 0 to the POST port 0x80, which no device
     * claims: each one is a full exit to the VMM and back (bench/boot_and_exits.py). */
    u64 n = cmdline_u64("bench_pio", 0);
    if (n) {
        u64 t0 = rdtsc();
        for (u64 i = 0; i < n; i++)
            outb(0x80, (u8)i);
        u64 dt = rdtsc() - t0;
        kprintf("bench_pio: %lu exits, %lu ns each\n", n, tsc_to_us(dt * 1000) / n);
    }
    enter_user(user_main, 0);
}

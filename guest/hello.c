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
    enter_user(user_main, 0);
}

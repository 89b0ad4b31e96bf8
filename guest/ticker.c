/* ticker: heartbeat from a ring-3 rdtsc busy loop.
 * cmdline: period_us=N (default 100000), count=N (exit 0 after N ticks),
 *          scratch=ADDR (a 32-bit register, pyvmm's `--device scratch` at 0xd1000000:
 *          each tick reads it, writes it back plus one and prints what it read).
 * line: "tick <n> t_us=<us since PVH entry> maxgap_us=<largest gap between two loop iterations>"
 *       then, with scratch=, " scratch=<value read>"
 * The gap excludes the time spent inside the write syscall itself (reset after each write). */
#include "guest.h"

static void user_main(void *arg)
{
    u64 period = us_to_tsc(cmdline_u64("period_us", 100000));
    u64 count = cmdline_u64("count", 0);
    volatile u32 *scratch = (volatile u32 *)cmdline_u64("scratch", 0);
    u64 n = 0, maxgap = 0;
    extern u64 g_stamp[8];
    if (cmdline_get("boottrace", 0))
        uprintf("boottrace: ring3 entered at %lu us, trace print %lu us\n", tsc_to_us(rdtsc() - g_boot_tsc), tsc_to_us(g_stamp[6]-g_stamp[5]));
    u64 last = rdtsc(), next = last + period;
    char buf[128];
    if (!period)
        period = 1;
    for (;;) {
        u64 now = rdtsc();
        u64 gap = now - last;
        if (gap > maxgap)
            maxgap = gap;
        last = now;
        if ((i64)(now - next) >= 0) {
            n++;
            int len = snprintf(buf, sizeof buf, "tick %lu t_us=%lu maxgap_us=%lu",
                               n, tsc_to_us(now - g_boot_tsc), tsc_to_us(maxgap));
            if (scratch) {
                u32 seen = *scratch;
                *scratch = seen + 1;
                len += snprintf(buf + len, sizeof buf - len, " scratch=%lu", (u64)seen);
            }
            buf[len++] = '\n';
            u_write(buf, len);
            if (count && n >= count)
                u_exit(0);
            next += period;
            last = rdtsc();
            if ((i64)(last - next) >= 0)   /* fell behind (pause): don't burst */
                next = last + period;
        }
    }
}

void guest_main(void)
{
    kprintf("ticker: period_us=%lu\n", cmdline_u64("period_us", 100000));
    enter_user(user_main, 0);
}

/* pattern: migration-test style memory dirtier (ring 3).
 * Pattern area: all RAM (memmap type 1, below the identity-map top) starting at
 * align_up(_end + 1 MiB, 4 KiB), capped at pattern_mb=N MiB (default: all).
 * The FIRST page of the area is the progress page (struct progress below); the
 * pattern pages are the remaining pages, in ascending address order.
 * Each pass k = 1, 2, ... increments byte 0 of every pattern page (so after pass k
 * every page holds k mod 256; during pass k, pages below progress.addr hold k,
 * pages at/above hold k-1). After each pass: "pass <k>". passes=N exits 0 after N.
 * dirty_mbps=N: pass 1 writes every page at full speed, later passes write pages at
 * N MB/s (10^6 bytes of pages per second); dirty_mbps=0: idle after pass 1 (the
 * migration benchmark's dirty rates). Without it every pass runs at full speed. */
#include "guest.h"

#define PATTERN_MAGIC 0x5041545445524e21ull   /* "PATTERN!" */
#define MAX_RANGES 32

struct progress {
    u64 magic;          /* +0  PATTERN_MAGIC */
    volatile u64 pass;  /* +8  pass currently being written (1-based) */
    volatile u64 addr;  /* +16 address of the page being written */
    u64 npages;         /* +24 number of pattern pages */
    u64 nranges;        /* +32 */
    struct { u64 start, end; } range[MAX_RANGES];   /* +40 pattern ranges [start,end) */
};

static struct progress *prog;

/* Wait until the page written now is due at the pace (per_page TSC ticks apart);
 * more than 10 ms behind (a migration's stop), start the pace afresh rather than burst. */
static void pace(u64 *next, u64 per_page)
{
    u64 now;
    while ((i64)((now = rdtsc()) - *next) < 0)
        __asm__ __volatile__("pause");
    *next = (now - *next > 10 * g_tsc_khz) ? now + per_page : *next + per_page;   /* 10 ms */
}

static void user_main(void *arg)
{
    u64 passes = cmdline_u64("passes", 0);
    const char *paced = cmdline_get("dirty_mbps", 0);
    u64 mbps = cmdline_u64("dirty_mbps", 0);
    u64 per_page = mbps ? 4096 * g_tsc_khz / (mbps * 1000) : 0;
    u64 next = 0;
    for (u64 k = 1;; k++) {
        if (k == 2 && paced && !mbps)
            for (;;)
                __asm__ __volatile__("pause");
        if (k == 2 && per_page)
            next = rdtsc();
        prog->pass = k;
        for (u64 r = 0; r < prog->nranges; r++) {
            for (u64 a = prog->range[r].start; a < prog->range[r].end; a += 4096) {
                if (k > 1 && per_page)
                    pace(&next, per_page);
                prog->addr = a;
                barrier();
                (*(volatile u8 *)a)++;
            }
        }
        uprintf("pass %lu\n", k);
        if (passes && k >= passes)
            u_exit(0);
    }
}

void guest_main(void)
{
    u64 start = ((u64)_end + (1 << 20) + 4095) & ~4095ull;
    u64 cap = cmdline_u64("pattern_mb", 0) << 20;
    u64 total = 0, nr = 0, npages = 0;
    struct { u64 start, end; } r[MAX_RANGES];
    for (u32 i = 0; i < g_memmap_n && nr < MAX_RANGES; i++) {
        if (g_memmap[i].type != 1)
            continue;
        u64 s = (g_memmap[i].addr + 4095) & ~4095ull;
        u64 e = (g_memmap[i].addr + g_memmap[i].size) & ~4095ull;
        if (s < start) s = start;
        if (e > g_mapped_top) e = g_mapped_top;
        if (cap && e - s > cap - total && s < e) e = s + (cap - total);
        if (s >= e)
            continue;
        r[nr].start = s; r[nr].end = e; nr++;
        total += e - s;
        if (cap && total >= cap)
            break;
    }
    if (!nr) {
        kprintf("pattern: no RAM above 0x%lx\n", start);
        dbg_exit(1);
    }
    prog = (struct progress *)r[0].start;
    r[0].start += 4096;
    prog->magic = PATTERN_MAGIC;
    prog->pass = 0;
    prog->addr = 0;
    prog->nranges = nr;
    for (u64 i = 0; i < nr; i++) {
        prog->range[i].start = r[i].start;
        prog->range[i].end = r[i].end;
        npages += (r[i].end - r[i].start) >> 12;
    }
    prog->npages = npages;
    kprintf("pattern: progress=0x%lx pages=%lu ranges=%lu first=0x%lx\n",
            (u64)prog, npages, nr, r[0].start);
    enter_user(user_main, 0);
}

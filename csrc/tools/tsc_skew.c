/* tsc_skew: do this host's CPUs agree on the TSC?  No KVM involved.
 *
 * One thread pinned to each online CPU.  Each, in a loop, reads what the others last
 * published, then (ordered after, lfence) its own TSC: if its own is behind, the two
 * CPUs' TSCs are that many cycles apart (the cache line's trip between them only
 * hides skew, never makes it).  The same check guest/smp.c runs inside a guest, which
 * on a PVM host reads the host's TSC: what this finds, the guest can see too.
 *
 *   tsc_skew [seconds]   prints "cpus=N seconds=S reads=R back=B worst=W cycles"
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define MAX_CPUS 256

struct cpu {
    volatile uint64_t published, reads, back, worst;
} __attribute__((aligned(64)));

static struct cpu cpus[MAX_CPUS];
static int ncpus;
static volatile int stop;

static inline uint64_t rdtsc_ordered(void)
{
    uint32_t lo, hi;
    __asm__ __volatile__("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return (uint64_t)hi << 32 | lo;
}

static void *run(void *arg)
{
    struct cpu *me = arg;
    int index = (int)(me - cpus);
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(index, &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0) {
        fprintf(stderr, "tsc_skew: cannot pin a thread to CPU %d\n", index);
        exit(1);
    }
    while (!stop) {
        uint64_t newest = 0;
        for (int j = 0; j < ncpus; j++)
            if (j != index && cpus[j].published > newest)
                newest = cpus[j].published;
        uint64_t now = rdtsc_ordered();
        if (now < newest) {
            me->back++;
            if (newest - now > me->worst)
                me->worst = newest - now;
        }
        me->published = now;
        me->reads++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 5;
    ncpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpus < 2 || ncpus > MAX_CPUS) {
        fprintf(stderr, "tsc_skew: needs 2 to %d CPUs, this host has %d\n", MAX_CPUS, ncpus);
        return 1;
    }
    pthread_t threads[MAX_CPUS];
    for (int i = 0; i < ncpus; i++)
        pthread_create(&threads[i], NULL, run, &cpus[i]);
    struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    nanosleep(&ts, NULL);
    stop = 1;
    uint64_t reads = 0, back = 0, worst = 0;
    for (int i = 0; i < ncpus; i++) {
        pthread_join(threads[i], NULL);
        reads += cpus[i].reads;
        back += cpus[i].back;
        if (cpus[i].worst > worst)
            worst = cpus[i].worst;
    }
    printf("cpus=%d seconds=%g reads=%lu back=%lu worst=%lu cycles\n", ncpus, seconds,
           (unsigned long)reads, (unsigned long)back, (unsigned long)worst);
    return 0;
}

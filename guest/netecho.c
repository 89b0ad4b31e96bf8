/* netecho: polling virtio-mmio (v2) virtio-net driver, all of it in ring 3.
 * cmdline: virtio_mmio.device=<size>@<base>:<irq> (several allowed; default probe 0xd0000000),
 *          ip=A.B.C.D (default 10.0.0.2), stats=0 (disable the 1 s stats line),
 *          bad=loop|oob|zero|long (post a malformed TX chain, print the device status),
 *          announce=1 (negotiate CTRL_VQ + GUEST_ANNOUNCE: see announce_poll()).
 * Answers ARP for its IP, ICMP echo, UDP echo on port 7. */
#include "guest.h"

/* virtio-mmio registers */
#define VM_MAGIC        0x000
#define VM_VERSION      0x004
#define VM_DEVICE_ID    0x008
#define VM_DEV_FEAT     0x010
#define VM_DEV_FEAT_SEL 0x014
#define VM_DRV_FEAT     0x020
#define VM_DRV_FEAT_SEL 0x024
#define VM_QUEUE_SEL    0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM    0x038
#define VM_QUEUE_READY  0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_ISR          0x060
#define VM_ISR_ACK      0x064
#define VM_STATUS       0x070
#define VM_QUEUE_DESC   0x080
#define VM_QUEUE_AVAIL  0x090
#define VM_QUEUE_USED   0x0a0
#define VM_CONFIG       0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

#define F_MAC       (1ull << 5)
#define F_MRG_RXBUF (1ull << 15)
#define F_STATUS    (1ull << 16)
#define F_CTRL_VQ   (1ull << 17)
#define F_GUEST_ANNOUNCE (1ull << 21)
#define F_EVENT_IDX (1ull << 29)
#define F_VERSION_1 (1ull << 32)

#define D_NEXT  1
#define D_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

#define QSZ 256
#define CTRL_QSZ 8
#define ISR_CONFIG 2
#define NET_S_ANNOUNCE 2
#define CTRL_ANNOUNCE 3
#define CTRL_ANNOUNCE_ACK 0
#define BUFSZ 2048
#define HDRLEN 12

struct desc { u64 addr; u32 len; u16 flags, next; };
struct avail { u16 flags, idx, ring[QSZ + 1]; };
struct used_elem { u32 id, len; };
struct used { u16 flags, idx; struct used_elem ring[QSZ]; u16 avail_event; };

struct vq {
    u16 size, qidx, avail_idx, last_used, last_kick;
    volatile struct desc *desc;
    volatile struct avail *avail;
    volatile struct used *used;
    u8 *bufs;
};

static u8 rx_desc[4096] PGT, rx_avail[4096] PGT, rx_used[4096] PGT;
static u8 tx_desc[4096] PGT, tx_avail[4096] PGT, tx_used[4096] PGT;
static u8 rx_bufs[QSZ * BUFSZ] PGT, tx_bufs[QSZ * BUFSZ] PGT;
static u8 ctrl_desc[4096] PGT, ctrl_avail[4096] PGT, ctrl_used[4096] PGT, ctrl_buf[4096] PGT;

static volatile u8 *mmio;
static u64 features;
static int event_idx;
static struct vq rxq, txq, ctrlq;
static u16 tx_free[QSZ];
static int tx_nfree;
static u8 my_mac[6];
static u32 my_ip;                /* host order */
static u64 n_rx, n_tx, n_drop;
static struct { u32 ip; u8 mac[6]; } arp_cache[8];
static int arp_n;

static inline u32 rd32(u32 off) { return *(volatile u32 *)(mmio + off); }
static inline void wr32(u32 off, u32 v) { *(volatile u32 *)(mmio + off) = v; }
static inline u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline void put16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = (u8)v; }
static inline u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static inline void put32(u8 *p, u32 v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = (u8)v; }

static u32 csum_add(u32 sum, const u8 *p, size_t n)
{
    for (; n > 1; n -= 2, p += 2)
        sum += (u32)(p[0] << 8 | p[1]);
    if (n)
        sum += (u32)(p[0] << 8);
    return sum;
}
static u16 csum_fold(u32 sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

static int need_event(u16 ev, u16 new_idx, u16 old)
{
    return (u16)(new_idx - ev - 1) < (u16)(new_idx - old);
}

static void kick(struct vq *q)
{
    mb();
    u16 old = q->last_kick, nw = q->avail_idx;
    int notify = event_idx ? need_event(q->used->avail_event, nw, old) && 1
                           : !(q->used->flags & USED_F_NO_NOTIFY);
    /* used->avail_event sits right after ring[size]; size == QSZ here */
    q->last_kick = nw;
    if (notify && old != nw)
        wr32(VM_QUEUE_NOTIFY, q->qidx);
}

static void publish(struct vq *q, u16 id)
{
    q->avail->ring[q->avail_idx % q->size] = id;
    barrier();
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
}

static int setup_queue(struct vq *q, u16 idx, u16 size, u8 *d, u8 *a, u8 *u, u8 *bufs)
{
    wr32(VM_QUEUE_SEL, idx);
    u32 max = rd32(VM_QUEUE_NUM_MAX);
    if (max < size) {
        uprintf("netecho: queue %u max %u < %u\n", idx, max, size);
        return -1;
    }
    memset(d, 0, 4096); memset(a, 0, 4096); memset(u, 0, 4096);
    q->size = size; q->qidx = idx;
    q->desc = (void *)d; q->avail = (void *)a; q->used = (void *)u; q->bufs = bufs;
    q->avail_idx = q->last_used = q->last_kick = 0;
    q->avail->flags = AVAIL_F_NO_INTERRUPT;
    q->avail->ring[size] = 0x8000;         /* used_event: far away (we poll) */
    wr32(VM_QUEUE_NUM, size);
    wr32(VM_QUEUE_DESC, (u32)(u64)d);      wr32(VM_QUEUE_DESC + 4, (u32)((u64)d >> 32));
    wr32(VM_QUEUE_AVAIL, (u32)(u64)a);     wr32(VM_QUEUE_AVAIL + 4, (u32)((u64)a >> 32));
    wr32(VM_QUEUE_USED, (u32)(u64)u);      wr32(VM_QUEUE_USED + 4, (u32)((u64)u >> 32));
    wr32(VM_QUEUE_READY, 1);
    return 0;
}

static int probe(u64 base)
{
    volatile u8 *m = (volatile u8 *)base;
    if (base == 0 || base >= g_mapped_top)
        return 0;
    if (*(volatile u32 *)(m + VM_MAGIC) != 0x74726976)
        return 0;
    if (*(volatile u32 *)(m + VM_DEVICE_ID) != 1)
        return 0;
    u32 ver = *(volatile u32 *)(m + VM_VERSION);
    if (ver != 2) {
        uprintf("netecho: virtio-mmio at 0x%lx is version %u (need 2)\n", base, ver);
        return 0;
    }
    mmio = m;
    return 1;
}

static int find_device(void)
{
    static const char key[] = "virtio_mmio.device=";
    const char *p = g_cmdline;
    int any = 0;
    while (*p) {
        while (*p == ' ') p++;
        const char *tok = p;
        while (*p && *p != ' ') p++;
        size_t tl = p - tok, kl = sizeof key - 1;
        if (tl <= kl || strncmp(tok, key, kl))
            continue;
        any = 1;
        const char *v = tok + kl, *end = p, *at = v;
        while (at < end && *at != '@') at++;
        if (at == end) continue;
        const char *colon = at + 1;
        while (colon < end && *colon != ':') colon++;
        int ok;
        u64 base = parse_u64(at + 1, colon - at - 1, &ok);
        if (ok && probe(base))
            return 1;
    }
    if (!any && probe(0xd0000000))
        return 1;
    return 0;
}

static void arp_learn(u32 ip, const u8 *mac)
{
    for (int i = 0; i < arp_n; i++)
        if (arp_cache[i].ip == ip) { memcpy(arp_cache[i].mac, mac, 6); return; }
    int i = arp_n < 8 ? arp_n++ : (int)(ip % 8);
    arp_cache[i].ip = ip;
    memcpy(arp_cache[i].mac, mac, 6);
}

static void reclaim_tx(void)
{
    u16 uidx = txq.used->idx;
    barrier();
    while (txq.last_used != uidx) {
        u32 id = txq.used->ring[txq.last_used % QSZ].id;
        if (id < QSZ && tx_nfree < QSZ)
            tx_free[tx_nfree++] = (u16)id;
        txq.last_used++;
    }
}

/* get a TX buffer (hdr zeroed); returns descriptor id or -1 */
static int tx_get(u8 **frame)
{
    if (!tx_nfree)
        reclaim_tx();
    if (!tx_nfree)
        return -1;
    int id = tx_free[--tx_nfree];
    u8 *b = tx_bufs + (u64)id * BUFSZ;
    memset(b, 0, HDRLEN);
    *frame = b + HDRLEN;
    return id;
}

static void tx_post(int id, size_t len)
{
    volatile struct desc *d = &txq.desc[id];
    d->addr = (u64)(tx_bufs + (u64)id * BUFSZ);
    d->len = (u32)(HDRLEN + len);
    d->flags = 0;
    d->next = 0;
    publish(&txq, (u16)id);
    n_tx++;
}

static void handle_frame(const u8 *f, size_t len)
{
    if (len < 14)
        return;
    u16 type = be16(f + 12);
    u8 *o;
    int id;
    if (type == 0x0806 && len >= 42) {
        const u8 *a = f + 14;
        if (be16(a) != 1 || be16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4)
            return;
        u32 spa = be32(a + 14), tpa = be32(a + 24);
        if (spa)
            arp_learn(spa, a + 8);
        if (be16(a + 6) != 1 || tpa != my_ip)
            return;
        if ((id = tx_get(&o)) < 0) { n_drop++; return; }
        memcpy(o, f + 6, 6);
        memcpy(o + 6, my_mac, 6);
        put16(o + 12, 0x0806);
        u8 *r = o + 14;
        put16(r, 1); put16(r + 2, 0x0800); r[4] = 6; r[5] = 4; put16(r + 6, 2);
        memcpy(r + 8, my_mac, 6); put32(r + 14, my_ip);
        memcpy(r + 18, a + 8, 6); put32(r + 24, spa);
        memset(o + 42, 0, 18);
        tx_post(id, 60);
        return;
    }
    if (type != 0x0800 || len < 34)
        return;
    const u8 *ip = f + 14;
    u32 ihl = (ip[0] & 15) * 4u;
    if ((ip[0] >> 4) != 4 || ihl < 20)
        return;
    u32 tot = be16(ip + 2);
    if (tot < ihl || 14 + tot > len || be32(ip + 16) != my_ip)
        return;
    if (be16(ip + 6) & 0x3fff)          /* fragments: ignore */
        return;
    u8 proto = ip[9];
    const u8 *l4 = ip + ihl;
    u32 l4len = tot - ihl;
    if (proto == 1) {
        if (l4len < 8 || l4[0] != 8)
            return;
    } else if (proto == 17) {
        if (l4len < 8 || be16(l4 + 2) != 7 || be16(l4 + 4) > l4len || be16(l4 + 4) < 8)
            return;
    } else {
        return;
    }
    if ((id = tx_get(&o)) < 0) { n_drop++; return; }
    memcpy(o, f + 6, 6);
    memcpy(o + 6, my_mac, 6);
    put16(o + 12, 0x0800);
    u8 *rip = o + 14;
    memcpy(rip, ip, tot);
    memcpy(rip + 12, ip + 16, 4);       /* src <- our ip (the dst) */
    memcpy(rip + 16, ip + 12, 4);       /* dst <- sender */
    rip[8] = 64;
    put16(rip + 10, 0);
    put16(rip + 10, csum_fold(csum_add(0, rip, ihl)));
    u8 *r4 = rip + ihl;
    if (proto == 1) {
        r4[0] = 0;
        put16(r4 + 2, 0);
        put16(r4 + 2, csum_fold(csum_add(0, r4, l4len)));
    } else {
        u16 ulen = be16(l4 + 4);
        put16(r4, be16(l4 + 2));
        put16(r4 + 2, be16(l4));
        put16(r4 + 6, 0);
        u32 s = csum_add(0, rip + 12, 8);
        s += 17 + ulen;
        u16 c = csum_fold(csum_add(s, r4, ulen));
        put16(r4 + 6, c ? c : 0xffff);
    }
    size_t flen = 14 + tot;
    if (flen < 60) { memset(o + flen, 0, 60 - flen); flen = 60; }
    tx_post(id, flen);
}

/* One command on the control queue: {class, cmd} readable, the ack byte writable.  The
 * device answers it while handling our QueueNotify write (a VM exit), so the used ring
 * has moved when the write returns; wait a little in case it has not.  The ack, or -1. */
static int ctrl_command(u8 class, u8 cmd)
{
    volatile u8 *b = ctrl_buf;
    b[0] = class; b[1] = cmd; b[16] = 0xff;
    ctrlq.desc[0] = (struct desc){ (u64)ctrl_buf, 2, D_NEXT, 1 };
    ctrlq.desc[1] = (struct desc){ (u64)ctrl_buf + 16, 1, D_WRITE, 0 };
    publish(&ctrlq, 0);
    mb();
    wr32(VM_QUEUE_NOTIFY, 2);
    u64 t0 = rdtsc(), lim = us_to_tsc(1000000);
    while (ctrlq.used->idx == ctrlq.last_used)
        if (rdtsc() - t0 > lim)
            return -1;
    ctrlq.last_used++;
    barrier();
    if (ctrlq.used->idx != ctrlq.last_used)   /* one command, one used entry: else the
                                                 device lost its place in the ring */
        uprintf("netecho: ctrl queue: device used %u, expected %u\n", ctrlq.used->idx,
                ctrlq.last_used);
    return b[16];
}

/* announce=1: every 20 ms look at the interrupt status (we poll, interrupts are off); on a
 * configuration change with VIRTIO_NET_S_ANNOUNCE set, send a gratuitous ARP for our IP
 * from our MAC (virtio 1.2 §5.1.6.5.4: the guest announces itself after a migration) and
 * ack it with VIRTIO_NET_CTRL_ANNOUNCE_ACK, which clears the bit. */
static void announce_poll(void)
{
    u32 isr = rd32(VM_ISR);
    if (!isr)
        return;
    wr32(VM_ISR_ACK, isr);
    if (!(isr & ISR_CONFIG) || !(*(volatile u16 *)(mmio + VM_CONFIG + 6) & NET_S_ANNOUNCE))
        return;
    u8 *o;
    int id = tx_get(&o);
    if (id < 0) {
        n_drop++;
        return;                        /* the bit stays set: the next look tries again */
    }
    memset(o, 0xff, 6);
    memcpy(o + 6, my_mac, 6);
    put16(o + 12, 0x0806);
    u8 *r = o + 14;
    put16(r, 1); put16(r + 2, 0x0800); r[4] = 6; r[5] = 4; put16(r + 6, 1);
    memcpy(r + 8, my_mac, 6); put32(r + 14, my_ip);
    memset(r + 18, 0, 6); put32(r + 24, my_ip);
    memset(o + 42, 0, 18);
    tx_post(id, 60);
    kick(&txq);
    int ack = ctrl_command(CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK);
    if (ack == 0)
        uprintf("netecho: announced (gratuitous ARP), acked\n");
    else
        uprintf("netecho: announced (gratuitous ARP), ack=%d\n", ack);
}

static void rx_post(u16 id)
{
    volatile struct desc *d = &rxq.desc[id];
    d->addr = (u64)(rx_bufs + (u64)id * BUFSZ);
    d->len = BUFSZ;
    d->flags = D_WRITE;
    d->next = 0;
    publish(&rxq, id);
}

static void bad_chain(void)
{
    int i;
    const char *mode = "";
    size_t l;
    const char *v = cmdline_get("bad", &l);
    volatile struct desc *d = txq.desc;
    u64 buf = (u64)tx_bufs;
    if (cmdline_is("bad", "loop")) {
        mode = "loop";
        d[0] = (struct desc){ buf, HDRLEN, D_NEXT, 1 };
        d[1] = (struct desc){ buf + BUFSZ, 64, D_NEXT, 0 };
    } else if (cmdline_is("bad", "oob")) {
        mode = "oob";
        d[0] = (struct desc){ 0x3f0000000000ull, 64 + HDRLEN, 0, 0 };
    } else if (cmdline_is("bad", "zero")) {
        mode = "zero";
        d[0] = (struct desc){ buf, 0, 0, 0 };
    } else if (cmdline_is("bad", "long")) {
        mode = "long";
        for (i = 0; i < QSZ; i++)
            d[i] = (struct desc){ buf + (u64)i * BUFSZ, HDRLEN + 8, D_NEXT, (u16)(i + 1) };
        /* last one points past the table: chain longer than the queue */
    } else {
        (void)v; (void)l;
        uprintf("netecho: unknown bad= mode\n");
        return;
    }
    tx_nfree = 0;                      /* descriptors are poisoned: stop transmitting */
    publish(&txq, 0);
    mb();
    wr32(VM_QUEUE_NOTIFY, 1);
    u64 t0 = rdtsc(), lim = us_to_tsc(200000);
    u32 st;
    while (!((st = rd32(VM_STATUS)) & S_NEEDS_RESET) && rdtsc() - t0 < lim)
        cpu_relax();
    uprintf("netecho: bad=%s status=0x%x\n", mode, st);
}

static int parse_ip(const char *s, size_t len, u32 *out)
{
    u32 v = 0;
    size_t i = 0;
    for (int part = 0; part < 4; part++) {
        u32 x = 0;
        int digits = 0;
        while (i < len && s[i] >= '0' && s[i] <= '9') { x = x * 10 + (s[i++] - '0'); digits++; }
        if (!digits || x > 255) return -1;
        v = v << 8 | x;
        if (part < 3) { if (i >= len || s[i] != '.') return -1; i++; }
    }
    if (i != len) return -1;
    *out = v;
    return 0;
}

static void user_main(void *arg)
{
    size_t l;
    const char *ipstr = cmdline_get("ip", &l);
    my_ip = 0x0a000002;
    if (ipstr && parse_ip(ipstr, l, &my_ip) < 0)
        uprintf("netecho: bad ip=, using 10.0.0.2\n");
    if (!find_device()) {
        uprintf("netecho: no virtio-net (virtio-mmio v2) device found\n");
        u_exit(1);
    }
    wr32(VM_STATUS, 0);
    while (rd32(VM_STATUS))
        cpu_relax();
    wr32(VM_STATUS, S_ACK);
    wr32(VM_STATUS, S_ACK | S_DRIVER);
    wr32(VM_DEV_FEAT_SEL, 0);
    u64 offered = rd32(VM_DEV_FEAT);
    wr32(VM_DEV_FEAT_SEL, 1);
    offered |= (u64)rd32(VM_DEV_FEAT) << 32;
    if (!(offered & F_VERSION_1)) {
        uprintf("netecho: device lacks VERSION_1 (features=0x%lx)\n", offered);
        wr32(VM_STATUS, S_FAILED);
        u_exit(1);
    }
    int announce = cmdline_is("announce", "1");
    features = offered & (F_VERSION_1 | F_MAC | F_MRG_RXBUF | F_EVENT_IDX |
                          (announce ? F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE : 0));
    announce = (features & (F_CTRL_VQ | F_GUEST_ANNOUNCE)) == (F_CTRL_VQ | F_GUEST_ANNOUNCE);
    event_idx = !!(features & F_EVENT_IDX);
    wr32(VM_DRV_FEAT_SEL, 0);
    wr32(VM_DRV_FEAT, (u32)features);
    wr32(VM_DRV_FEAT_SEL, 1);
    wr32(VM_DRV_FEAT, (u32)(features >> 32));
    wr32(VM_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(rd32(VM_STATUS) & S_FEATURES_OK)) {
        uprintf("netecho: FEATURES_OK not accepted\n");
        wr32(VM_STATUS, S_FAILED);
        u_exit(1);
    }
    if (setup_queue(&rxq, 0, QSZ, rx_desc, rx_avail, rx_used, rx_bufs) < 0 ||
        setup_queue(&txq, 1, QSZ, tx_desc, tx_avail, tx_used, tx_bufs) < 0 ||
        (announce && setup_queue(&ctrlq, 2, CTRL_QSZ, ctrl_desc, ctrl_avail, ctrl_used,
                                 ctrl_buf) < 0)) {
        wr32(VM_STATUS, S_FAILED);
        u_exit(1);
    }
    static const u8 def_mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
    for (int i = 0; i < 6; i++)
        my_mac[i] = (features & F_MAC) ? mmio[VM_CONFIG + i] : def_mac[i];
    for (int i = 0; i < QSZ; i++)
        tx_free[i] = (u16)(QSZ - 1 - i);
    tx_nfree = QSZ;
    for (int i = 0; i < QSZ; i++)
        rx_post((u16)i);
    wr32(VM_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    mb();
    wr32(VM_QUEUE_NOTIFY, 0);
    rxq.last_kick = rxq.avail_idx;
    uprintf("netecho: up ip=%u.%u.%u.%u mac=%02x:%02x:%02x:%02x:%02x:%02x features=0x%lx\n",
            my_ip >> 24, (my_ip >> 16) & 255, (my_ip >> 8) & 255, my_ip & 255,
            my_mac[0], my_mac[1], my_mac[2], my_mac[3], my_mac[4], my_mac[5], features);
    if (cmdline_get("bad", 0))
        bad_chain();
    if (announce)   /* a command the device does not know: it must answer VIRTIO_NET_ERR */
        uprintf("netecho: ctrl class 0 cmd 0 -> ack=%d\n", ctrl_command(0, 0));
    u64 next_look = rdtsc() + us_to_tsc(20000);

    int stats = !cmdline_is("stats", "0");
    u64 next_stats = rdtsc() + us_to_tsc(1000000);
    u64 last_rx = 0, last_tx = 0;
    for (;;) {
        u16 uidx = rxq.used->idx;
        barrier();
        int got = 0;
        while (rxq.last_used != uidx) {
            volatile struct used_elem *e = &rxq.used->ring[rxq.last_used % QSZ];
            u32 id = e->id, len = e->len;
            rxq.last_used++;
            if (id >= QSZ)
                continue;
            u8 *b = rx_bufs + (u64)id * BUFSZ;
            u16 nbufs = b[10] | b[11] << 8;
            n_rx++;
            if (len > HDRLEN && len <= BUFSZ && (nbufs <= 1 || !(features & F_MRG_RXBUF)))
                handle_frame(b + HDRLEN, len - HDRLEN);
            rx_post((u16)id);
            /* merged buffers beyond the first: drop them (we never get them at MTU 1500) */
            for (u16 k = 1; (features & F_MRG_RXBUF) && k < nbufs; k++) {
                while (rxq.last_used == (uidx = rxq.used->idx))
                    cpu_relax();
                barrier();
                u32 id2 = rxq.used->ring[rxq.last_used % QSZ].id;
                rxq.last_used++;
                if (id2 < QSZ)
                    rx_post((u16)id2);
            }
            got = 1;
        }
        if (got) {
            rxq.avail->ring[QSZ] = rxq.last_used + 0x8000;   /* keep used_event far away */
            kick(&txq);
            kick(&rxq);
            reclaim_tx();
        } else {
            cpu_relax();
        }
        if (announce && (i64)(rdtsc() - next_look) >= 0) {
            next_look = rdtsc() + us_to_tsc(20000);
            announce_poll();
        }
        if (stats && (i64)(rdtsc() - next_stats) >= 0) {
            next_stats += us_to_tsc(1000000);
            if (n_rx != last_rx || n_tx != last_tx) {
                uprintf("netecho: rx=%lu tx=%lu drop=%lu\n", n_rx, n_tx, n_drop);
                last_rx = n_rx; last_tx = n_tx;
            }
        }
    }
}

void guest_main(void)
{
    enter_user(user_main, 0);
}

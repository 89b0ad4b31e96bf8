/* Helpers usable from both rings: memory/string, formatting, cmdline, ring-3 wrappers. */
#include "guest.h"

void *memset(void *d, int c, size_t n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memcpy(void *d, const void *s, size_t n) { u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; return d; }
void *memmove(void *d, const void *s, size_t n)
{
    u8 *p = d; const u8 *q = s;
    if (p < q) while (n--) *p++ = *q++;
    else { p += n; q += n; while (n--) *--p = *--q; }
    return d;
}
int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++) if (*p != *q) return *p - *q;
    return 0;
}
size_t strlen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) { if (*a != *b) return (u8)*a - (u8)*b; if (!*a) return 0; }
    return 0;
}

struct out { char *buf; size_t n, pos; };
static void put(struct out *o, char c) { if (o->pos + 1 < o->n) o->buf[o->pos] = c; o->pos++; }

int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap)
{
    struct out o = { buf, n, 0 };
    for (; *fmt; fmt++) {
        if (*fmt != '%') { put(&o, *fmt); continue; }
        fmt++;
        int zero = 0, left = 0, width = 0, lng = 0;
        for (;; fmt++) {
            if (*fmt == '0') zero = 1;
            else if (*fmt == '-') left = 1;
            else break;
        }
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') { lng = 1; fmt++; }
        char tmp[24];
        const char *s = tmp;
        int len = 0, neg = 0;
        u64 v;
        switch (*fmt) {
        case 'd': case 'i': {
            i64 x = lng ? va_arg(ap, i64) : va_arg(ap, int);
            neg = x < 0; v = neg ? -(u64)x : (u64)x;
            goto dec;
        }
        case 'u':
            v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
        dec:
            do { tmp[sizeof tmp - 1 - len++] = '0' + v % 10; v /= 10; } while (v);
            if (neg) tmp[sizeof tmp - 1 - len++] = '-';
            s = tmp + sizeof tmp - len;
            break;
        case 'p': lng = 1; /* fallthrough */
        case 'x': case 'X':
            v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
            do { tmp[sizeof tmp - 1 - len++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
            s = tmp + sizeof tmp - len;
            break;
        case 'c': tmp[0] = (char)va_arg(ap, int); len = 1; break;
        case 's': s = va_arg(ap, const char *); if (!s) s = "(null)"; len = strlen(s); break;
        case '%': tmp[0] = '%'; len = 1; break;
        case 0: fmt--; continue;
        default: tmp[0] = '?'; len = 1; break;
        }
        int pad = width > len ? width - len : 0;
        if (!left) while (pad-- > 0) put(&o, zero ? '0' : ' ');
        for (int i = 0; i < len; i++) put(&o, s[i]);
        if (left) while (pad-- > 0) put(&o, ' ');
    }
    if (o.n) o.buf[o.pos < o.n ? o.pos : o.n - 1] = 0;
    return (int)o.pos;
}

int snprintf(char *buf, size_t n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vsnprintf(buf, n, fmt, ap);
    va_end(ap);
    return r;
}

u64 parse_u64(const char *s, size_t len, int *ok)
{
    u64 v = 0;
    size_t i = 0;
    int base = 10, digits = 0;
    if (len > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) { base = 16; i = 2; }
    for (; i < len; i++) {
        char c = s[i];
        int d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (base == 16 && c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (base == 16 && c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else break;
        v = v * base + d;
        digits++;
    }
    if (i < len) {
        char c = s[i++];
        if (c == 'k' || c == 'K') v <<= 10;
        else if (c == 'm' || c == 'M') v <<= 20;
        else if (c == 'g' || c == 'G') v <<= 30;
        else i--;
    }
    if (ok) *ok = digits > 0 && i == len;
    return v;
}

const char *cmdline_get(const char *key, size_t *len)
{
    size_t kl = strlen(key);
    const char *p = g_cmdline;
    while (*p) {
        while (*p == ' ') p++;
        const char *tok = p;
        while (*p && *p != ' ') p++;
        size_t tl = p - tok;
        if (tl >= kl && !strncmp(tok, key, kl)) {
            if (tl == kl) { if (len) *len = 0; return tok + kl; }
            if (tok[kl] == '=') { if (len) *len = tl - kl - 1; return tok + kl + 1; }
        }
    }
    return NULL;
}

u64 cmdline_u64(const char *key, u64 def)
{
    size_t l;
    int ok;
    const char *v = cmdline_get(key, &l);
    if (!v) return def;
    u64 x = parse_u64(v, l, &ok);
    return ok ? x : def;
}

int cmdline_is(const char *key, const char *val)
{
    size_t l;
    const char *v = cmdline_get(key, &l);
    return v && l == strlen(val) && !strncmp(v, val, l);
}

NORETURN void u_exit(int code)
{
    for (;;) syscall3(SYS_EXIT, code, 0, 0);
}

long u_write(const void *buf, size_t len) { return syscall3(SYS_WRITE, (long)buf, (long)len, 0); }

void uprintf(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 1) n = sizeof buf - 1;
    u_write(buf, n);
}

#include "guest.h"
void guest_main(void) { kprintf("netecho: todo\n"); }

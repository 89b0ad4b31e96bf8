/* PVH entry: 32-bit protected mode, paging off, %ebx = struct hvm_start_info. */
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define PTE_FLAGS 0x87          /* P | RW | US | PS(2 MiB) */
#define PTE_UC    0x18          /* PCD | PWT */

	.pushsection .note.Xen, "a", @note
	.balign 4
	.long 4                     /* namesz */
	.long 8                     /* descsz */
	.long XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.balign 4
	.quad pvh_start
	.balign 4
	.popsection

	.section .text.boot, "ax"
	.code32
	.globl pvh_start
pvh_start:
	cli
	cld
	movl %ebx, pvh_info_paddr
	rdtsc
	movl %eax, g_boot_tsc
	movl %edx, g_boot_tsc+4
	/* page tables are static data (see .data.pgt): nothing to build here */
	movl $0x20, %eax            /* CR4 = PAE only (TSD clear, no SMEP/SMAP) */
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xC0000080, %ecx      /* EFER.LME */
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax
	movl %eax, %cr0
	lgdt gdt_ptr
	ljmp $0x08, $start64

	.code64
start64:
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	movabsq $kstack_top, %rsp
	rdtsc
	movl %eax, g_t64
	movl %edx, g_t64+4
	/* zero .bss */
	movabsq $__bss_start, %rdi
	movabsq $__bss_end, %rcx
	subq %rdi, %rcx
	shrq $3, %rcx
	xorl %eax, %eax
	rep stosq
	movl pvh_info_paddr, %edi
	call kmain
3:	hlt
	jmp 3b

/* ---- exceptions ---- */
.macro ISR_NOERR n
isr\n:	pushq $0
	pushq $\n
	jmp isr_common
.endm
.macro ISR_ERR n
isr\n:	pushq $\n
	jmp isr_common
.endm
ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR 8
ISR_NOERR 9
ISR_ERR 10
ISR_ERR 11
ISR_ERR 12
ISR_ERR 13
ISR_ERR 14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR 17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR 21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR 29
ISR_ERR 30
ISR_NOERR 31

isr_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	cld
	call exc_handler
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp
	iretq

/* enter_user(fn=%rdi, arg=%rsi): uses ustack_top */
	.globl enter_user
enter_user:
	movabsq $ustack_top, %rdx
	subq $8, %rdx
	movabsq $user_return, %rax
	movq %rax, (%rdx)
	pushq $0x23                 /* SS: user data */
	pushq %rdx                  /* RSP */
	pushq $0x2                  /* RFLAGS: IF=0, IOPL=0 */
	pushq $0x1b                 /* CS: user code */
	pushq %rdi                  /* RIP */
	movq %rsi, %rdi
	xorl %eax, %eax
	xorl %ebx, %ebx
	xorl %ecx, %ecx
	xorl %edx, %edx
	xorl %esi, %esi
	xorl %ebp, %ebp
	xorl %r8d, %r8d
	xorl %r9d, %r9d
	xorl %r10d, %r10d
	xorl %r11d, %r11d
	iretq
user_return:                    /* ring 3: fn returned -> exit(0) */
	xorl %edi, %edi
	xorl %eax, %eax
	ud2
	jmp user_return

	.section .rodata
	.balign 8
	.globl isr_table
isr_table:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad isr\n
	.endr

	.section .data
	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00AF9A000000FFFF    /* 0x08 kernel code64 */
	.quad 0x00CF92000000FFFF    /* 0x10 kernel data */
	.quad 0x00AFFA000000FFFF    /* 0x18 user code64 (sel 0x1b) */
	.quad 0x00CFF2000000FFFF    /* 0x20 user data (sel 0x23) */
	.quad 0, 0                  /* 0x28 TSS (filled by C) */
gdt_end:
	.balign 8
	.word 0
	.globl gdt_ptr
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt
	.balign 8
	.globl pvh_info_paddr
pvh_info_paddr:
	.long 0
	.balign 8
	.globl g_boot_tsc
g_boot_tsc:
	.quad 0
	.globl g_t64
g_t64:	.quad 0

/* Identity map of 0..4 GiB with 2 MiB pages, all U/S; 3..4 GiB uncached.
 * Prebuilt at assembly time: ring-0 code is slow (emulated) on some hosts. */
	.section .data.pgt, "aw"
	.balign 4096
	.globl pml4, pdpt, pd_low
pml4:	.quad pdpt + 7
	.fill 511, 8, 0
pdpt:	.quad pd_low + 7, pd_low + 0x1007, pd_low + 0x2007, pd_low + 0x3007
	.fill 508, 8, 0
pd_low:
	.set i, 0
	.rept 2048
	.if i >= 1536
	.quad (i << 21) | PTE_FLAGS | PTE_UC
	.else
	.quad (i << 21) | PTE_FLAGS
	.endif
	.set i, i + 1
	.endr

	.section .pgt, "aw", @nobits
	.balign 16
kstack:	.skip 16384
	.globl kstack_top
kstack_top:
	.skip 16
ustack:	.skip 65536
	.globl ustack_top
ustack_top:

/* Real-mode start-up code for application processors. The `smp` command copies it to
 * TRAMPOLINE_ADDR (0x8000, SIPI vector 0x08) and patches outboard_tramp_stack per AP.
 * 16-bit real mode (CS = 0x0800) -> 32-bit protected mode -> long mode -> outboard_ap_entry64.
 * It is data, not code, in the image (.rodata): it only runs from its copy. */

    .set TRAMP, 0x8000

    .section .rodata.outboard_trampoline, "a"
    .balign 16
    .globl outboard_trampoline_start
outboard_trampoline_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (outboard_tramp_gdtr - outboard_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $(TRAMP + outboard_tramp32 - outboard_trampoline_start)

    .code32
outboard_tramp32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl (TRAMP + outboard_tramp_cr3 - outboard_trampoline_start), %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax
    movl %eax, %cr0
    ljmp $0x08, $(TRAMP + outboard_tramp64 - outboard_trampoline_start)

    .code64
outboard_tramp64:
    movq (TRAMP + outboard_tramp_stack - outboard_trampoline_start), %rsp
    movq (TRAMP + outboard_tramp_entry - outboard_trampoline_start), %rax
    jmpq *%rax

    .balign 8
outboard_tramp_gdtr:
    .word 31
    .long outboard_gdt
    .balign 8
outboard_tramp_cr3:
    .long outboard_pml4
    .balign 8
outboard_tramp_entry:
    .quad outboard_ap_entry64
    .globl outboard_tramp_stack
outboard_tramp_stack:
    .quad 0
    .globl outboard_trampoline_end
outboard_trampoline_end:

    .section .outboard_stack, "aw", @nobits
    .balign 4096
    .globl outboard_ap_stacks
outboard_ap_stacks:
    .skip {ap_stacks_size}

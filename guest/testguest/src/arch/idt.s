/* Exception stubs: stub N is at outboard_isr_stubs + 16 * N. Each pushes a zero error code where
 * the CPU pushes none, then the vector, so the common path sees one frame layout:
 * [rsp] = vector, [rsp + 8] = error code, [rsp + 16] = RIP.
 * Interrupt stubs (vectors 32..79) follow at the same stride: they push the vector and return
 * with iretq after the handler, saving every register the C ABI lets a callee clobber. */

    .section .text.outboard_isr, "ax"
    .code64
    .macro outboard_isr vec, has_error
    .balign 16
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vec
    jmp outboard_isr_common
    .endm

    .balign 16
    .globl outboard_isr_stubs
outboard_isr_stubs:
    outboard_isr 0, 0
    outboard_isr 1, 0
    outboard_isr 2, 0
    outboard_isr 3, 0
    outboard_isr 4, 0
    outboard_isr 5, 0
    outboard_isr 6, 0
    outboard_isr 7, 0
    outboard_isr 8, 1
    outboard_isr 9, 0
    outboard_isr 10, 1
    outboard_isr 11, 1
    outboard_isr 12, 1
    outboard_isr 13, 1
    outboard_isr 14, 1
    outboard_isr 15, 0
    outboard_isr 16, 0
    outboard_isr 17, 1
    outboard_isr 18, 0
    outboard_isr 19, 0
    outboard_isr 20, 0
    outboard_isr 21, 1
    outboard_isr 22, 0
    outboard_isr 23, 0
    outboard_isr 24, 0
    outboard_isr 25, 0
    outboard_isr 26, 0
    outboard_isr 27, 0
    outboard_isr 28, 0
    outboard_isr 29, 1
    outboard_isr 30, 1
    outboard_isr 31, 0

    .macro outboard_irq vec
    .balign 16
    pushq $\vec
    jmp outboard_irq_common
    .endm

    .set outboard_irq_vec, 32
    .rept 48
    outboard_irq outboard_irq_vec
    .set outboard_irq_vec, outboard_irq_vec + 1
    .endr

/* RSP is 16-byte aligned when the CPU pushes the 40-byte frame; the vector and nine registers
 * make 80 more bytes, so one 8-byte pad aligns the call. */
outboard_irq_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    movq 72(%rsp), %rdi
    subq $8, %rsp
    call {irq}
    addq $8, %rsp
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $8, %rsp
    iretq

outboard_isr_common:
    movq (%rsp), %rdi
    movq 8(%rsp), %rsi
    movq 16(%rsp), %rdx
    andq $-16, %rsp
    call {handler}
1:
    cli
    hlt
    jmp 1b

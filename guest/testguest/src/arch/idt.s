/* Exception stubs: stub N is at outboard_isr_stubs + 16 * N. Each pushes a zero error code where
 * the CPU pushes none, then the vector, so the common path sees one frame layout:
 * [rsp] = vector, [rsp + 8] = error code, [rsp + 16] = RIP. */

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

/* Boot entries, GDT, page tables and the boot stack.
 *
 *   PVH (32-bit, paging off, EBX = hvm_start_info) --+
 *                                                      +--> boot_common(rdi = protocol, rsi = info)
 *   Linux 64-bit (long mode, RSI = boot_params) ------+       --> rust_main
 *
 * Both paths load our GDT and our page tables (identity map of 0-4 GiB in 2 MiB pages, the
 * last GiB uncached for MMIO) before touching anything outside the image. */

    .section .text.boot32, "ax"
    .code32
    .globl outboard_pvh_entry
outboard_pvh_entry:
    cli
    cld
    movl %ebx, %esi
    lgdt outboard_gdtr
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $outboard_boot_stack_top, %esp
    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE */
    movl %eax, %cr4
    movl $outboard_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          /* EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    ljmp $0x08, $outboard_pvh_long

    .section .text.boot64, "ax"
    .code64
outboard_pvh_long:
    movl %esi, %esi                 /* upper half undefined after the mode switch */
    movl $1, %edi
    jmp outboard_boot_common

    .globl outboard_linux_entry64
outboard_linux_entry64:
    cli
    cld
    leaq outboard_boot_stack_top(%rip), %rsp
    lgdt outboard_gdtr(%rip)
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:
    leaq outboard_pml4(%rip), %rax
    movq %rax, %cr3
    xorl %edi, %edi

outboard_boot_common:
    leaq outboard_boot_stack_top(%rip), %rsp
    movq %rdi, %r8
    movq %rsi, %r9
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq
    movq %r8, %rdi
    movq %r9, %rsi
    call {rust_main}
2:
    cli
    hlt
    jmp 2b

/* Application processors arrive here from the real-mode trampoline, in long mode on our page
 * tables, with RSP set; RDI = their stack top (also in RSP). */
    .globl outboard_ap_entry64
outboard_ap_entry64:
    lgdt outboard_gdtr(%rip)
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    pushq $0x08
    leaq 3f(%rip), %rax
    pushq %rax
    lretq
3:
    call {ap_main}
4:
    cli
    hlt
    jmp 4b

    .section .data.outboard_boot, "aw"
    .balign 16
    .globl outboard_gdt
outboard_gdt:
    .quad 0
    .quad 0x00af9b000000ffff        /* 0x08: 64-bit code (accessed bit preset: no GDT writes) */
    .quad 0x00cf93000000ffff        /* 0x10: flat data */
    .quad 0x00cf9b000000ffff        /* 0x18: flat 32-bit code, for the AP trampoline */
outboard_gdt_end:
    .balign 8
    .globl outboard_gdtr
outboard_gdtr:
    .word outboard_gdt_end - outboard_gdt - 1
    .quad outboard_gdt

    .section .data.outboard_pagetables, "aw"
    .balign 4096
    .globl outboard_pml4
outboard_pml4:
    .quad outboard_pdpt + 0x3
    .fill 511, 8, 0
outboard_pdpt:
    .quad outboard_pd + 0x3
    .quad outboard_pd + 0x1003
    .quad outboard_pd + 0x2003
    .quad outboard_pd + 0x3003
    .fill 508, 8, 0
outboard_pd:
    .set outboard_page, 0
    .rept 1536
    .quad outboard_page + 0x83      /* present, writable, 2 MiB */
    .set outboard_page, outboard_page + 0x200000
    .endr
    .rept 512
    .quad outboard_page + 0x9b      /* and cache-disabled, write-through: MMIO */
    .set outboard_page, outboard_page + 0x200000
    .endr

    .section .outboard_stack, "aw", @nobits
    .balign 16
    .skip 32768
    .globl outboard_boot_stack_top
outboard_boot_stack_top:

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz */
    .long 8                         /* descsz */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad outboard_pvh_entry

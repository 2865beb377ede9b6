/* A CPL 0 guest that takes an interrupt through its IDT: the serial transmitter-empty
 * interrupt, routed IOAPIC pin 4 -> MSI -> LAPIC -> IDT vector 0x41. The handler prints
 * "I" and powers off; if nothing arrives within ~2M pause loops it prints "N". Probes
 * whether interrupts reach guest kernel code on nested (PVM) KVM, where CPL 0 runs in
 * the instruction emulator. 32-bit protected mode, paging off (the PVH entry state). */
    .section .note.pvh, "a", @note
    .p2align 2
    .long 4, 4, 18
    .asciz "Xen"
    .long _start
    .text
    .code32
    .globl _start
_start:
    lgdtl gdtr
    ljmpl $0x08, $1f
1:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $stack_top, %esp
    movl $handler, %eax
    movw %ax, idt + 0x41*8
    movw $0x08, idt + 0x41*8 + 2
    movw $0x8e00, idt + 0x41*8 + 4
    shrl $16, %eax
    movw %ax, idt + 0x41*8 + 6
    lidtl idtr
    movl $0x1ff, 0xfee000f0
    movl $0x19, 0xfec00000
    movl $0, 0xfec00010
    movl $0x18, 0xfec00000
    movl $0x41, 0xfec00010
    movw $0x3f9, %dx
    movb $2, %al
    outb %al, %dx
    sti
    movl $2000000, %ecx
2:  pause
    loop 2b
    cli
    movw $0x3f8, %dx
    movb $'N', %al
    outb %al, %dx
    movw $0x600, %dx
    movb $0x34, %al
    outb %al, %dx
3:  jmp 3b
handler:
    movw $0x3f8, %dx
    movb $'I', %al
    outb %al, %dx
    movl $0, 0xfee000b0
    movw $0x600, %dx
    movb $0x34, %al
    outb %al, %dx
4:  jmp 4b
    .data
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
gdtr:
    .word 23
    .long gdt
idtr:
    .word 0x41*8 + 7
    .long idt
    .p2align 3
idt:
    .fill 0x42*8, 1, 0
    .bss
    .fill 4096, 1, 0
stack_top:

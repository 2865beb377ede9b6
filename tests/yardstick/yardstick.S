/* cellvm's yardstick guest: a whole ELF file written out by hand, headers included, so
 * building it needs only an assembler and objcopy (no linker script):
 *
 *     as --64 -o yardstick.o yardstick.S && objcopy -O binary yardstick.o yardstick.elf
 *
 * It boots through its PVH note (32-bit protected mode, no paging), writes "OK\n" to
 * COM1, then knocks on every door a VMM may use to end a VM, in turn: QEMU's
 * isa-debug-exit (port 0xf4), the ACPI sleep register of Cloud Hypervisor's layout
 * (port 0x600, SLP_TYP 5 | SLP_EN) and the i8042's reset line (port 0x64, 0xfe: cellvm,
 * Firecracker). Whichever the VMM understands ends the run; if none does, it halts.
 * The same file boots in every VMM, which makes it a fair measure of start-up time. */

        .set    LOAD, 0x100000          /* guest-physical load address (1 MiB) */
        .set    PT_LOAD, 1
        .set    PT_NOTE, 4
        .set    XEN_ELFNOTE_PHYS32_ENTRY, 18
#define (LOAD + sym - file) (LOAD + (sym) - file)

        .text
file:
/* ELF64 header */
        .byte   0x7f, 'E', 'L', 'F', 2, 1, 1, 0   /* 64-bit, little-endian, version 1 */
        .quad   0                                 /* padding of e_ident */
        .word   2                                 /* ET_EXEC */
        .word   62                                /* EM_X86_64 */
        .long   1                                 /* EV_CURRENT */
        .quad   (LOAD + entry32 - file)                       /* e_entry */
        .quad   phdrs - file                      /* e_phoff */
        .quad   0                                 /* e_shoff: no sections */
        .long   0                                 /* e_flags */
        .word   64                                /* e_ehsize */
        .word   56                                /* e_phentsize */
        .word   2                                 /* e_phnum */
        .word   64, 0, 0                          /* e_shentsize, e_shnum, e_shstrndx */
phdrs:
/* The whole file as one read/execute segment at LOAD. */
        .long   PT_LOAD, 5                        /* p_type, p_flags = R|X */
        .quad   0, LOAD, LOAD                     /* p_offset, p_vaddr, p_paddr */
        .quad   end - file, end - file            /* p_filesz, p_memsz */
        .quad   0x1000                            /* p_align */
/* The PVH entry note. */
        .long   PT_NOTE, 4                        /* p_type, p_flags = R */
        .quad   note - file, (LOAD + note - file), (LOAD + note - file)
        .quad   note_end - note, note_end - note
        .quad   4
note:
        .long   4, 4, XEN_ELFNOTE_PHYS32_ENTRY    /* namesz, descsz, type */
        .asciz  "Xen"
        .long   (LOAD + entry32 - file)
note_end:

/* (port, byte) pairs: the exits, tried in order. */
exits:
        .word   0xf4
        .byte   0x00
        .word   0x600
        .byte   0x34
        .word   0x64
        .byte   0xfe
exits_end:
message:
        .ascii  "OK\n"
message_end:

        .code32
entry32:
        cli
        mov     $(LOAD + message - file), %esi
        mov     $0x3f8, %dx                       /* COM1 data register */
1:      lodsb
        outb    %al, %dx
        cmp     $(LOAD + message_end - file), %esi
        jne     1b
        mov     $(LOAD + exits - file), %esi
2:      lodsw                                     /* the port */
        mov     %ax, %dx
        lodsb                                     /* the byte */
        outb    %al, %dx
        cmp     $(LOAD + exits_end - file), %esi
        jne     2b
3:      hlt
        jmp     3b
end:

/* cellvm test guest: the CPL 0 part.
 *
 * Everything here runs in KVM's instruction emulator on nested hosts, so it is kept to
 * the few instructions that cannot run at CPL 3: load a GDT, enable long mode with the
 * static identity page tables below (4 GiB, 2 MiB pages, user bit set), and drop to
 * CPL 3 with port I/O allowed. Port I/O is granted twice: IOPL 3 in RFLAGS, and a TSS
 * whose I/O permission bitmap allows every port. On nested PVM hosts the guest's IOPL
 * is not honoured at CPL 3 (RFLAGS.IOPL reads back 0), so the bitmap is what works
 * there. There is no IDT: the program never returns to CPL 0, and a fault in it
 * triple-faults the VM, which the VMM reports with the vCPU's RIP. (With `idle` as the
 * command line's first word the BSP never leaves CPL 0: it halts, below.)
 *
 * Entry is the PVH one (32-bit protected mode, paging off, %ebx = hvm_start_info).
 */
    .section .note.pvh, "a", @note
    .p2align 2
    .long 4                     /* name size */
    .long 4                     /* descriptor size */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_entry

    .section .text.boot, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    cli
    movl %ebx, start_info_paddr
    movl $tss, %eax             /* patch the TSS base into its descriptor */
    movw %ax, gdt_tss + 2
    shrl $16, %eax
    movb %al, gdt_tss + 4
    movb %ah, gdt_tss + 7
    lgdtl gdt_desc
    movl $0x4b564d01, %ecx      /* MSR_KVM_SYSTEM_TIME_NEW: kvm-clock, for the TSC rate */
    movl $pvclock + 1, %eax     /* bit 0: enable */
    xorl %edx, %edx
    wrmsr
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $boot_stack_top, %esp
    movl %cr4, %eax
    orl $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT: the Rust code uses SSE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx      /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax      /* clear EM */
    orl $0x80000003, %eax       /* PG | MP | PE */
    movl %eax, %cr0
    ljmpl $0x18, $long_mode

    .code64
long_mode:
    movw $0x30, %ax
    ltr %ax
    /* `idle` as the command line's first word: say so on COM1 and halt here, at CPL 0
     * with IF=0, for good. A halted vCPU sleeps in KVM and costs no CPU: the idle VMs
     * of the density benchmark. */
    movl start_info_paddr, %esi
    movq 0x18(%rsi), %rsi       /* hvm_start_info.cmdline_paddr */
    testq %rsi, %rsi
    jz 2f
    cmpl $0x656c6469, (%rsi)    /* "idle" */
    jne 2f
    testb $0xdf, 4(%rsi)        /* followed by NUL or a space */
    jnz 2f
    movw $0x3f8, %dx
    movb $'i', %al
    outb %al, %dx
    movb $'d', %al
    outb %al, %dx
    movb $'l', %al
    outb %al, %dx
    movb $'e', %al
    outb %al, %dx
    movb $'\n', %al
    outb %al, %dx
1:  hlt
    jmp 1b
2:
    pushq $0x23                 /* user SS */
    pushq $user_stack_top - 8   /* user RSP, aligned as after a call */
    pushq $0x3002               /* RFLAGS: IOPL 3, IF 0 */
    pushq $0x2b                 /* user CS, 64-bit */
    pushq $guest_main
    iretq

/* Application processors start here in real mode, at the page the BSP copied this to
 * (SIPI vector 0x08 -> 0x8000). They report their APIC id into this same page and halt:
 * a dozen emulated instructions prove the vCPU ran guest code with the identity the VMM
 * gave it. */
    .code16
    .globl ap_tramp_start, ap_tramp_end, ap_tramp_count, ap_tramp_slots
ap_tramp_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    movl $1, %eax
    cpuid
    shrl $24, %ebx
    movb $1, (ap_tramp_slots - ap_tramp_start)(%bx)
    lock incw (ap_tramp_count - ap_tramp_start)
1:  hlt
    jmp 1b
    .p2align 2
ap_tramp_count:
    .word 0
ap_tramp_slots:
    .fill 256, 1, 0
ap_tramp_end:

    .code64
    .section .data.gdt, "aw"
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
    .quad 0x00af9a000000ffff    /* 0x18: 64-bit code */
    .quad 0x00cff2000000ffff    /* 0x20: user data (DPL 3) */
    .quad 0x00affa000000ffff    /* 0x28: user 64-bit code (DPL 3) */
gdt_tss:                        /* 0x30: 64-bit TSS, base patched at entry */
    .quad 0x0000890000000000 + (tss_end - tss - 1)
    .quad 0
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .section .data.pagetables, "aw"
    .p2align 12
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0007
    .quad pd + 0x1007
    .quad pd + 0x2007
    .quad pd + 0x3007
    .fill 508, 8, 0
pd:                             /* 0..3 GiB: RAM, write-back */
    .set page, 0
    .rept 1536
    .quad (page << 21) | 0x87   /* present, writable, user, 2 MiB */
    .set page, page + 1
    .endr
    .rept 512                   /* 3..4 GiB: MMIO (LAPIC, IOAPIC, PCI), uncached */
    .quad (page << 21) | 0x9f
    .set page, page + 1
    .endr

    .section .data.tss, "aw"
    .p2align 4
tss:
    .fill 0x66, 1, 0
    .word tss_iomap - tss       /* I/O permission bitmap offset */
tss_iomap:
    .fill 8192, 1, 0            /* every port allowed */
    .byte 0xff
tss_end:

    .section .bss.stacks, "aw", @nobits
    .p2align 4
boot_stack:
    .fill 512, 1, 0
boot_stack_top:
    .p2align 4
user_stack:
    .fill 65536, 1, 0
user_stack_top:
    .globl start_info_paddr
    .p2align 3
start_info_paddr:
    .quad 0
    .globl pvclock
    .p2align 5                  /* pvclock_vcpu_time_info: 32 bytes, one page */
pvclock:
    .fill 32, 1, 0

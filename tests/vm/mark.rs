//! vm-mark: executes the marker instruction the harness's instruction
//! counter (scripts/vm/insn-count.c) reports totals at, and exits. The cost
//! harness runs it between benchmark runs in the guest.

fn main() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `nopl 0x52424c4b(%rax)`, a 7-byte NOP: it reads no memory
    // and changes no register or flag.
    unsafe {
        std::arch::asm!(".byte 0x0f, 0x1f, 0x80, 0x4b, 0x4c, 0x42, 0x52", options(nomem, nostack, preserves_flags))
    };
}

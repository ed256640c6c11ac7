//! Classic BPF programs for packet sockets (pure: the instructions are built here and
//! attached by `sys::packet`). A host's uplink takes only frames for its own VMs'
//! MACs, broadcast and multicast; the kernel drops everything else before it is copied
//! to userspace: flooded unicast for other hosts' VMs, and the host kernel's own
//! traffic, 64 KiB GSO frames included.

use crate::wire::MacAddr;

/// One classic BPF instruction, laid out as the kernel's `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Opcodes (linux/filter.h): class | size | mode, or class | op | source.
const LD_B_ABS: u16 = 0x30;
const LD_H_ABS: u16 = 0x28;
const LD_W_ABS: u16 = 0x20;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

/// What an accepting `ret` returns: the bytes to keep, more than any frame has (a GSO
/// frame is at most 64 KiB plus headers), as tcpdump uses.
pub const ACCEPT: u32 = 0x0004_0000;
/// The kernel's limit is 4096 instructions; each MAC takes 5, the prologue 3 and the
/// end 1. Beyond this many MACs the filter admits every frame rather than drop a VM's.
pub const MAX_MACS: usize = 800;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// A program admitting the frames whose destination MAC is one of `macs`, or a group
/// address (broadcast, multicast: the I/G bit of the first byte); frames shorter than
/// a destination MAC are dropped (the loads fail). More than [`MAX_MACS`] addresses:
/// every frame is admitted.
pub fn mac_filter(macs: &[MacAddr]) -> Vec<Insn> {
    if macs.len() > MAX_MACS {
        return vec![insn(RET_K, 0, 0, ACCEPT)];
    }
    let mut p = Vec::with_capacity(4 + 5 * macs.len());
    // Group address: admit.
    p.push(insn(LD_B_ABS, 0, 0, 0));
    p.push(insn(JMP_JSET_K, 0, 1, 0x01));
    p.push(insn(RET_K, 0, 0, ACCEPT));
    for mac in macs {
        let b = mac.as_bytes();
        // Loads are big-endian: bytes 2..6 as one word, bytes 0..2 as a half-word.
        let low = u32::from_be_bytes([b[2], b[3], b[4], b[5]]);
        let high = u16::from_be_bytes([b[0], b[1]]) as u32;
        p.push(insn(LD_W_ABS, 0, 0, 2));
        p.push(insn(JMP_JEQ_K, 0, 3, low));
        p.push(insn(LD_H_ABS, 0, 0, 0));
        p.push(insn(JMP_JEQ_K, 0, 1, high));
        p.push(insn(RET_K, 0, 0, ACCEPT));
    }
    p.push(insn(RET_K, 0, 0, 0));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of the kernel's classic BPF interpreter these programs use: absolute
    /// loads, JEQ/JSET against a constant, RET of a constant. A load past the frame's
    /// end drops it, as in the kernel.
    fn run(prog: &[Insn], frame: &[u8]) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        while pc < prog.len() {
            let i = prog[pc];
            let at = i.k as usize;
            pc += 1;
            match i.code {
                LD_B_ABS => match frame.get(at) {
                    Some(&x) => a = x as u32,
                    None => return 0,
                },
                LD_H_ABS => match frame.get(at..at + 2) {
                    Some(x) => a = u16::from_be_bytes([x[0], x[1]]) as u32,
                    None => return 0,
                },
                LD_W_ABS => match frame.get(at..at + 4) {
                    Some(x) => a = u32::from_be_bytes([x[0], x[1], x[2], x[3]]),
                    None => return 0,
                },
                JMP_JEQ_K | JMP_JSET_K => {
                    let hit = if i.code == JMP_JEQ_K {
                        a == i.k
                    } else {
                        a & i.k != 0
                    };
                    pc += if hit { i.jt } else { i.jf } as usize;
                }
                RET_K => return i.k,
                other => panic!("opcode {other:#x} not in this interpreter"),
            }
        }
        panic!("program ran off its end");
    }

    fn frame_to(dst: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f
    }

    const VM1: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x01, 0x00]);
    const VM2: MacAddr = MacAddr([0x02, 0x00, 0x0a, 0x0b, 0x0c, 0x0d]);

    #[test]
    fn admits_its_macs_and_group_addresses_only() {
        let p = mac_filter(&[VM1, VM2]);
        assert_eq!(p.len(), 3 + 5 * 2 + 1);
        for ok in [
            VM1.0,
            VM2.0,
            [0xff; 6],
            [0x01, 0x00, 0x5e, 0, 0, 1],
            [0x33, 0x33, 0, 0, 0, 1],
        ] {
            assert_eq!(run(&p, &frame_to(ok)), ACCEPT, "{ok:02x?}");
        }
        for no in [
            // The host kernel's own MAC, another host's VM, and near misses of VM1
            // in either half.
            [0x0a, 0x11, 0x22, 0x33, 0x44, 0x55],
            [0x02, 0x00, 0x00, 0x00, 0x02, 0x00],
            [0x02, 0x01, 0x00, 0x00, 0x01, 0x00],
            [0x06, 0x00, 0x00, 0x00, 0x01, 0x00],
            // VM2's low half with VM1's high half matches neither whole.
            [0x02, 0x00, 0x0a, 0x0b, 0x0c, 0x0e],
        ] {
            assert_eq!(run(&p, &frame_to(no)), 0, "{no:02x?}");
        }
        // Runts: too short to hold a destination MAC.
        assert_eq!(run(&p, &VM1.0[..4]), 0);
        assert_eq!(run(&p, &[]), 0);
    }

    #[test]
    fn no_macs_admits_group_addresses_and_too_many_admit_everything() {
        let p = mac_filter(&[]);
        assert_eq!(run(&p, &frame_to([0xff; 6])), ACCEPT);
        assert_eq!(run(&p, &frame_to(VM1.0)), 0);

        let many: Vec<MacAddr> = (0..MAX_MACS as u32)
            .map(|i| {
                let b = i.to_be_bytes();
                MacAddr([0x02, 0, b[0], b[1], b[2], b[3]])
            })
            .collect();
        let p = mac_filter(&many);
        assert!(p.len() <= 4096, "{} instructions", p.len());
        assert_eq!(run(&p, &frame_to(many[MAX_MACS - 1].0)), ACCEPT);
        assert_eq!(run(&p, &frame_to(many[0].0)), ACCEPT);
        assert_eq!(run(&p, &frame_to(VM2.0)), 0);
        let mut more = many.clone();
        more.push(VM2);
        let p = mac_filter(&more);
        assert_eq!(run(&p, &frame_to([0x0a, 1, 2, 3, 4, 5])), ACCEPT);
    }
}

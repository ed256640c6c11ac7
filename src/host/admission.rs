//! Host admission control (pure): how much host memory a VM reserves, and whether a host
//! has room for it.
//!
//! A VM costs its host its configured memory plus an overhead that grows with vCPU
//! count, memory size and guest word size (`data/vm-memory-overhead.csv`, the vSphere
//! table). The table has rows at 256, 512, … 16384 MB for 1, 2 and 4 vCPUs; other sizes:
//!
//! - below 256 MB: the 256 MB row;
//! - between two rows: the row of the next larger size (never under-reserve);
//! - above 16384 MB: linear extrapolation from the last two rows of that vCPU count,
//!   rounded up;
//! - a vCPU count the table lacks is an error, not a guess.

use std::sync::OnceLock;

/// The overhead table, as shipped.
const TABLE_CSV: &str = include_str!("../../data/vm-memory-overhead.csv");

/// Errors of admission control.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("no memory overhead figures for {vcpus} vCPUs (the table has {known})")]
    UnknownVcpus { vcpus: u8, known: String },
    #[error("guest word size must be 32 or 64 bits, not {0}")]
    BadWordBits(u8),
    #[error("VM memory must be at least 1 MB")]
    ZeroMemory,
    #[error("VM memory of {0} MB is too large to reserve")]
    TooLarge(u64),
    #[error("overhead table line {line}: {reason}")]
    Table { line: usize, reason: String },
    #[error("host {host} has no room for {vm}: needs {need_mb} MB{breakdown}, {free_mb} MB free of {capacity_mb} MB ({used_mb} MB in use)",
        breakdown = .reservation.map(|r| format!(" ({} MB memory + {} MB overhead)", r.memory_mb, r.overhead_mb)).unwrap_or_default())]
    NoRoom {
        host: String,
        vm: String,
        need_mb: u64,
        /// How `need_mb` splits, when the caller knows it.
        reservation: Option<Reservation>,
        free_mb: u64,
        used_mb: u64,
        capacity_mb: u64,
    },
}

/// What a VM reserves on its host: its memory and the hypervisor's overhead for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    pub memory_mb: u64,
    pub overhead_mb: u64,
}

impl Reservation {
    pub fn total_mb(&self) -> u64 {
        self.memory_mb + self.overhead_mb
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    vcpus: u8,
    memory_mb: u64,
    overhead_32_mb: u64,
    overhead_64_mb: u64,
}

impl Row {
    fn overhead(&self, word_bits: u8) -> u64 {
        if word_bits == 32 {
            self.overhead_32_mb
        } else {
            self.overhead_64_mb
        }
    }
}

/// VM memory overhead by vCPU count, memory size and guest word size.
#[derive(Debug, Clone)]
pub struct OverheadTable {
    /// Sorted by (vcpus, memory_mb).
    rows: Vec<Row>,
}

impl OverheadTable {
    /// The table shipped in `data/vm-memory-overhead.csv`, parsed once.
    pub fn builtin() -> &'static OverheadTable {
        static TABLE: OnceLock<OverheadTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            // The shipped table is checked by the tests; failing here is a build defect.
            OverheadTable::parse(TABLE_CSV).expect("data/vm-memory-overhead.csv is valid")
        })
    }

    /// Parses `vcpus,memory_mb,overhead_32bit_mb,overhead_64bit_mb` with a header line.
    /// Every vCPU count needs at least two rows (for extrapolation).
    pub fn parse(csv: &str) -> Result<OverheadTable, AdmissionError> {
        let mut rows = Vec::new();
        for (i, line) in csv.lines().enumerate() {
            let line = line.trim();
            let n = i + 1;
            if line.is_empty() || (i == 0 && line.starts_with("vcpus")) {
                continue;
            }
            let bad = |reason: &str| AdmissionError::Table {
                line: n,
                reason: reason.to_string(),
            };
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() != 4 {
                return Err(bad("expected 4 fields"));
            }
            let num = |s: &str| s.parse::<u64>().map_err(|_| bad("not a number"));
            let vcpus = u8::try_from(num(f[0])?).map_err(|_| bad("vcpus out of range"))?;
            let row = Row {
                vcpus,
                memory_mb: num(f[1])?,
                overhead_32_mb: num(f[2])?,
                overhead_64_mb: num(f[3])?,
            };
            if row.vcpus == 0 || row.memory_mb == 0 {
                return Err(bad("vcpus and memory must be positive"));
            }
            rows.push(row);
        }
        rows.sort_by_key(|r| (r.vcpus, r.memory_mb));
        if rows.is_empty() {
            return Err(AdmissionError::Table {
                line: 0,
                reason: "no rows".into(),
            });
        }
        for w in rows.windows(2) {
            if w[0].vcpus == w[1].vcpus && w[0].memory_mb == w[1].memory_mb {
                return Err(AdmissionError::Table {
                    line: 0,
                    reason: format!("duplicate row {} vCPUs {} MB", w[0].vcpus, w[0].memory_mb),
                });
            }
        }
        let table = OverheadTable { rows };
        for v in table.vcpu_counts() {
            if table.rows_for(v).len() < 2 {
                return Err(AdmissionError::Table {
                    line: 0,
                    reason: format!("{v} vCPUs needs at least two rows"),
                });
            }
        }
        Ok(table)
    }

    /// vCPU counts the table covers, ascending.
    pub fn vcpu_counts(&self) -> Vec<u8> {
        let mut v: Vec<u8> = self.rows.iter().map(|r| r.vcpus).collect();
        v.dedup();
        v
    }

    fn rows_for(&self, vcpus: u8) -> &[Row] {
        let start = self.rows.partition_point(|r| r.vcpus < vcpus);
        let end = self.rows.partition_point(|r| r.vcpus <= vcpus);
        &self.rows[start..end]
    }

    /// Overhead in MB of a VM with `vcpus`, `memory_mb` and a `word_bits` (32 or 64)
    /// guest. Sizes between rows take the next larger row; below the first row, the
    /// first row; above the last row, linear extrapolation from the last two rows of
    /// that vCPU count, rounded up.
    pub fn overhead_mb(
        &self,
        vcpus: u8,
        memory_mb: u64,
        word_bits: u8,
    ) -> Result<u64, AdmissionError> {
        if word_bits != 32 && word_bits != 64 {
            return Err(AdmissionError::BadWordBits(word_bits));
        }
        if memory_mb == 0 {
            return Err(AdmissionError::ZeroMemory);
        }
        let rows = self.rows_for(vcpus);
        if rows.is_empty() {
            let known: Vec<String> = self.vcpu_counts().iter().map(u8::to_string).collect();
            return Err(AdmissionError::UnknownVcpus {
                vcpus,
                known: known.join(", "),
            });
        }
        if let Some(row) = rows.iter().find(|r| r.memory_mb >= memory_mb) {
            return Ok(row.overhead(word_bits));
        }
        // Above the table: parse() guarantees two rows per vCPU count.
        let (a, b) = (&rows[rows.len() - 2], &rows[rows.len() - 1]);
        let (oa, ob) = (a.overhead(word_bits), b.overhead(word_bits));
        let slope_num = ob.saturating_sub(oa);
        let slope_den = b.memory_mb - a.memory_mb;
        let extra = (memory_mb - b.memory_mb)
            .checked_mul(slope_num)
            .ok_or(AdmissionError::TooLarge(memory_mb))?
            .div_ceil(slope_den);
        ob.checked_add(extra)
            .ok_or(AdmissionError::TooLarge(memory_mb))
    }

    /// Memory and overhead a VM reserves.
    pub fn reservation(
        &self,
        vcpus: u8,
        memory_mb: u64,
        word_bits: u8,
    ) -> Result<Reservation, AdmissionError> {
        let overhead_mb = self.overhead_mb(vcpus, memory_mb, word_bits)?;
        if memory_mb.checked_add(overhead_mb).is_none() {
            return Err(AdmissionError::TooLarge(memory_mb));
        }
        Ok(Reservation {
            memory_mb,
            overhead_mb,
        })
    }
}

/// Memory and overhead a VM reserves, from the built-in table.
pub fn reservation(
    vcpus: u8,
    memory_mb: u64,
    word_bits: u8,
) -> Result<Reservation, AdmissionError> {
    OverheadTable::builtin().reservation(vcpus, memory_mb, word_bits)
}

/// Host memory in MB a VM reserves: its memory plus overhead (built-in table).
pub fn reserve_mb(vcpus: u8, memory_mb: u64, word_bits: u8) -> Result<u64, AdmissionError> {
    reservation(vcpus, memory_mb, word_bits).map(|r| r.total_mb())
}

/// Checks that `host` (of `capacity_mb`, `used_mb` already reserved) has room for
/// `vm_name` needing `need_mb`. The error names every figure.
pub fn check_room(
    host: &str,
    capacity_mb: u64,
    used_mb: u64,
    vm_name: &str,
    need_mb: u64,
) -> Result<(), AdmissionError> {
    check(host, capacity_mb, used_mb, vm_name, need_mb, None)
}

/// Like [`check_room`], with the reservation's memory and overhead named in the error.
pub fn check_room_for(
    host: &str,
    capacity_mb: u64,
    used_mb: u64,
    vm_name: &str,
    need: Reservation,
) -> Result<(), AdmissionError> {
    check(
        host,
        capacity_mb,
        used_mb,
        vm_name,
        need.total_mb(),
        Some(need),
    )
}

fn check(
    host: &str,
    capacity_mb: u64,
    used_mb: u64,
    vm_name: &str,
    need_mb: u64,
    reservation: Option<Reservation>,
) -> Result<(), AdmissionError> {
    let free_mb = capacity_mb.saturating_sub(used_mb);
    if need_mb <= free_mb {
        return Ok(());
    }
    Err(AdmissionError::NoRoom {
        host: host.to_string(),
        vm: vm_name.to_string(),
        need_mb,
        reservation,
        free_mb,
        used_mb,
        capacity_mb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> &'static OverheadTable {
        OverheadTable::builtin()
    }

    #[test]
    fn builtin_table_parses_with_every_row() {
        assert_eq!(t().rows.len(), 21);
        assert_eq!(t().vcpu_counts(), vec![1, 2, 4]);
    }

    #[test]
    fn exact_rows() {
        assert_eq!(t().overhead_mb(1, 1024, 64).unwrap(), 180);
        assert_eq!(t().overhead_mb(1, 1024, 32).unwrap(), 84);
        assert_eq!(t().overhead_mb(2, 4096, 64).unwrap(), 349);
        assert_eq!(t().overhead_mb(4, 16384, 32).unwrap(), 350);
        assert_eq!(t().overhead_mb(4, 256, 64).unwrap(), 511);
    }

    #[test]
    fn between_rows_take_the_next_larger() {
        assert_eq!(t().overhead_mb(1, 1025, 64).unwrap(), 188);
        assert_eq!(t().overhead_mb(1, 2047, 64).unwrap(), 188);
        assert_eq!(t().overhead_mb(2, 3000, 32).unwrap(), 157);
        assert_eq!(t().overhead_mb(4, 16383, 64).unwrap(), 734);
    }

    #[test]
    fn below_the_table_takes_the_first_row() {
        assert_eq!(t().overhead_mb(1, 1, 64).unwrap(), 174);
        assert_eq!(t().overhead_mb(1, 128, 32).unwrap(), 79);
        assert_eq!(t().overhead_mb(2, 255, 64).unwrap(), 288);
    }

    #[test]
    fn above_the_table_extrapolates_upwards() {
        // 1 vCPU 64-bit: 236 at 8192, 300 at 16384: 64 MB per 8192 MB.
        assert_eq!(t().overhead_mb(1, 24576, 64).unwrap(), 364);
        assert_eq!(t().overhead_mb(1, 32768, 64).unwrap(), 428);
        // One MB over rounds up: 64/8192 MB per MB -> 1.
        assert_eq!(t().overhead_mb(1, 16385, 64).unwrap(), 301);
        // 4 vCPU 32-bit: 222 at 8192, 350 at 16384.
        assert_eq!(t().overhead_mb(4, 65536, 32).unwrap(), 350 + 6 * 128);
        assert!(t().overhead_mb(1, u64::MAX, 64).is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let e = t().overhead_mb(3, 1024, 64).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no memory overhead figures for 3 vCPUs (the table has 1, 2, 4)"
        );
        assert_eq!(
            t().overhead_mb(1, 1024, 48),
            Err(AdmissionError::BadWordBits(48))
        );
        assert_eq!(t().overhead_mb(1, 0, 64), Err(AdmissionError::ZeroMemory));
        assert!(OverheadTable::parse("vcpus,memory_mb,a,b\n1,256,1\n").is_err());
        assert!(
            OverheadTable::parse("vcpus,memory_mb,a,b\n1,256,1,2\n").is_err(),
            "one row"
        );
        assert!(
            OverheadTable::parse("1,256,1,2\n1,256,1,2\n").is_err(),
            "duplicate"
        );
    }

    #[test]
    fn reserve_adds_memory_and_overhead() {
        assert_eq!(reserve_mb(1, 1024, 64).unwrap(), 1204);
        assert_eq!(
            reservation(2, 512, 32).unwrap(),
            Reservation {
                memory_mb: 512,
                overhead_mb: 101
            }
        );
    }

    #[test]
    fn room_check_names_every_figure() {
        assert!(check_room("silo105", 2048, 800, "vm1", 1248).is_ok());
        let e = check_room("silo105", 2048, 1248, "vm1", 1204).unwrap_err();
        assert_eq!(
            e.to_string(),
            "host silo105 has no room for vm1: needs 1204 MB, 800 MB free of 2048 MB (1248 MB in use)"
        );
        let need = reservation(1, 1024, 64).unwrap();
        let e = check_room_for("silo105", 2048, 1248, "vm1", need).unwrap_err();
        assert_eq!(
            e.to_string(),
            "host silo105 has no room for vm1: needs 1204 MB (1024 MB memory + 180 MB overhead), \
             800 MB free of 2048 MB (1248 MB in use)"
        );
        // Overcommitted host: nothing free, no underflow.
        let e = check_room("h", 100, 150, "v", 1).unwrap_err();
        assert!(e
            .to_string()
            .contains("0 MB free of 100 MB (150 MB in use)"));
    }
}

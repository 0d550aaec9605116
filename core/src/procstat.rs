//! A process's CPU time and resident memory, parsed from the text of Linux's
//! `/proc/<pid>/stat` and `/proc/<pid>/statm`.
//!
//! Pure parsing: the caller reads the files and knows the clock tick rate and
//! page size (`sysconf`), so the relay's `/metrics` and the load tester read
//! the same fields the same way.

/// User plus system CPU time in clock ticks, from the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) is in parentheses and may itself hold spaces and
/// parentheses, so the fields are counted from the last `)`: utime and stime
/// are fields 14 and 15, the 12th and 13th after the name. `None` when the text
/// is not in that form.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// Resident pages (the second field), from the text of `/proc/<pid>/statm`.
pub fn resident_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// Clock ticks as microseconds, at `ticks_per_sec` (`sysconf(_SC_CLK_TCK)`,
/// taken as 1 if 0), saturating at `u64::MAX`.
pub fn ticks_to_us(ticks: u64, ticks_per_sec: u64) -> u64 {
    let us = u128::from(ticks) * 1_000_000 / u128::from(ticks_per_sec.max(1));
    u64::try_from(us).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line of /proc/<pid>/stat (utime 1234, stime 56).
    const STAT: &str = "4242 (relay) S 1 4242 4242 0 -1 4194560 9000 0 3 0 1234 56 0 0 20 0 4 0 777 123456789 2500 18446744073709551615 1 1 0 0 0 0 0 4096 17638 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn cpu_is_utime_plus_stime() {
        assert_eq!(cpu_ticks(STAT), Some(1290));
    }

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let odd = STAT.replace("(relay)", "(a b) (c))");
        assert_eq!(cpu_ticks(&odd), Some(1290));
    }

    #[test]
    fn malformed_stat_text_gives_none() {
        assert_eq!(cpu_ticks(""), None);
        assert_eq!(cpu_ticks("4242 relay S 1 2 3"), None);
        assert_eq!(cpu_ticks("4242 (relay) S 1 2 3"), None);
        assert_eq!(
            cpu_ticks(&STAT.replace(" 1234 ", " x ")),
            None,
            "a non-number utime"
        );
    }

    #[test]
    fn resident_pages_is_the_second_field() {
        assert_eq!(resident_pages("5270 2500 1000 200 0 900 0\n"), Some(2500));
        assert_eq!(resident_pages("5270"), None);
        assert_eq!(resident_pages("5270 many"), None);
    }

    #[test]
    fn ticks_convert_to_microseconds() {
        assert_eq!(ticks_to_us(1290, 100), 12_900_000);
        assert_eq!(ticks_to_us(3, 1000), 3000);
        assert_eq!(ticks_to_us(7, 0), 7_000_000);
        assert_eq!(ticks_to_us(u64::MAX, 1), u64::MAX);
    }
}

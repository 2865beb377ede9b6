//! Output for people: aligned columns in virsh's manner, sizes and durations in short
//! words. (Scripts use `--json`.)

/// `1h02m03s`, `4m05s`, `12.3s`.
pub fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// Bytes in MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Columns padded to their widest cell, a rule under the header, one leading space as
/// virsh prints them.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from(" ");
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    let total: usize = width.iter().sum::<usize>() + 3 * width.len().saturating_sub(1) + 2;
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// `Key:            value` lines, as `virsh dominfo`.
pub fn fields(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let key = format!("{k}:");
            let w = 16.max(key.len() + 1);
            format!("{key:<w$}{v}\n")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_short() {
        assert_eq!(uptime(1234), "1.2s");
        assert_eq!(uptime(245_000), "4m05s");
        assert_eq!(uptime(3_723_000), "1h02m03s");
        assert_eq!(mib(3 << 19), "1.5 MiB");
    }

    #[test]
    fn columns_align_under_their_header() {
        let t = render(
            &["Id", "State"],
            &[
                vec!["a-long-id".into(), "running".into()],
                vec!["b".into(), "paused".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], " Id          State");
        assert!(lines[1].chars().all(|c| c == '-'));
        assert_eq!(lines[2], " a-long-id   running");
        assert_eq!(lines[3], " b           paused");
        assert_eq!(
            fields(&[("State", "running".into())]),
            "State:          running\n"
        );
    }
}

//! `cellvm-img`: the offline image tool (see the library's documentation). Output and
//! exit codes follow qemu-img: 0 success, 1 error; `check` 0 clean, 1 not completed,
//! 2 corruption, 3 leaks only.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cellvm_img::check::{check, CheckResult};
use cellvm_img::image::{
    self, copy_into, create_qcow2, create_raw, open_chain, open_file, parse_size, CreateOpts,
    Format, Layer, Status,
};
use cellvm_img::qcow2::{self, Error, Qcow2};
use cellvm_img::sandbox::{self, Mode};
use cellvm_img::{size_to_str, snapshot};
use serde_json::{json, Value};

const USAGE: &str = "usage: cellvm-img COMMAND [options]
  create [-f raw|qcow2] [-b BACKING -F FMT] [-o cluster_size=N] FILE [SIZE]
  info [-f FMT] [--output human|json] FILE
  map [-f FMT] [--output human|json] FILE
  check [-f FMT] [--output human|json] FILE
  resize [-f FMT] [--shrink] FILE [+|-]SIZE
  convert [-c] [-f FMT] -O FMT [-o cluster_size=N] SRC DST
  snapshot [-l | -c NAME | -a NAME | -d NAME] FILE
  commit [-f FMT] [-d] FILE
Not implemented: encryption, zstd, extended L2, external data files, bitmaps, check -r.";

/// Command-line arguments, parsed the way qemu-img takes them.
#[derive(Default)]
struct Args {
    fmt: Option<String>,
    out_fmt: Option<String>,
    backing: Option<String>,
    backing_fmt: Option<String>,
    opts: Vec<String>,
    output: Option<String>,
    compress: bool,
    shrink: bool,
    keep: bool,
    snap: Option<(char, Option<String>)>,
    sandbox: Option<String>,
    pos: Vec<String>,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("cellvm-img: {msg}");
    ExitCode::from(1)
}

fn parse_args(cmd: &str, argv: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut i = 0;
    let val = |i: &mut usize, name: &str| -> Result<String, String> {
        *i += 1;
        argv.get(*i)
            .cloned()
            .ok_or_else(|| format!("option {name} needs a value"))
    };
    while i < argv.len() {
        let s = argv[i].as_str();
        if let Some(v) = s.strip_prefix("--output=") {
            a.output = Some(v.into());
        } else if let Some(v) = s.strip_prefix("--x-sandbox=") {
            a.sandbox = Some(v.into());
        } else {
            match s {
                "-f" => a.fmt = Some(val(&mut i, s)?),
                "-O" => a.out_fmt = Some(val(&mut i, s)?),
                "-b" => a.backing = Some(val(&mut i, s)?),
                "-F" => a.backing_fmt = Some(val(&mut i, s)?),
                "-o" => a.opts.push(val(&mut i, s)?),
                "--output" => a.output = Some(val(&mut i, s)?),
                "--shrink" => a.shrink = true,
                "-q" | "-p" | "-U" => {}
                "-c" if cmd == "convert" => a.compress = true,
                "-d" if cmd == "commit" => a.keep = true,
                "-l" if cmd == "snapshot" => a.snap = Some(('l', None)),
                "-c" | "-a" | "-d" if cmd == "snapshot" => {
                    a.snap = Some((s.chars().nth(1).unwrap_or('l'), Some(val(&mut i, s)?)))
                }
                _ if s.starts_with('-')
                    && s.len() > 1
                    && !(cmd == "resize" && s[1..].starts_with(|c: char| c.is_ascii_digit())) =>
                {
                    return Err(format!("unknown option '{s}'"))
                }
                _ => a.pos.push(s.into()),
            }
        }
        i += 1;
    }
    Ok(a)
}

fn sandbox_mode(a: &Args) -> Result<Mode, String> {
    match a.sandbox.as_deref() {
        None | Some("full") => Ok(Mode::Full),
        Some("landlock") => Ok(Mode::LandlockOnly),
        Some("none") => Ok(Mode::None),
        Some(m) => Err(format!("unknown sandbox mode {m}")),
    }
}

fn enter(paths: &[PathBuf], mode: Mode) -> Result<(), String> {
    let abs: Vec<PathBuf> = paths
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    sandbox::enter(&abs, mode).map_err(|e| format!("sandbox: {e}"))
}

fn format_opt(s: &Option<String>) -> Result<Option<Format>, Error> {
    s.as_deref().map(str::parse).transpose()
}

fn cluster_bits(opts: &[String]) -> Result<(u32, u32), String> {
    let (mut bits, mut order) = (16, 4);
    for o in opts.iter().flat_map(|o| o.split(',')) {
        let (k, v) = o.split_once('=').unwrap_or((o, ""));
        match k {
            "cluster_size" => {
                let n = parse_size(v).ok_or_else(|| format!("bad cluster_size '{v}'"))?;
                if !n.is_power_of_two() || !(512..=2 << 20).contains(&n) {
                    return Err(format!(
                        "Cluster size must be a power of two between 512 and 2048k (not {v})"
                    ));
                }
                bits = n.trailing_zeros();
            }
            "refcount_bits" => {
                let n: u32 = v.parse().map_err(|_| format!("bad refcount_bits '{v}'"))?;
                if !n.is_power_of_two() || n > 64 {
                    return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
                }
                order = n.trailing_zeros();
            }
            "compat" if v == "1.1" || v == "v3" => {}
            _ => return Err(format!("Invalid parameter '{k}' (cellvm-img knows cluster_size, refcount_bits, compat=1.1)")),
        }
    }
    Ok((bits, order))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first().cloned() else {
        eprintln!("{USAGE}");
        return ExitCode::from(1);
    };
    if cmd == "--help" || cmd == "-h" || cmd == "help" {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let a = match parse_args(&cmd, &argv[1..]) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let mode = match sandbox_mode(&a) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let r = match cmd.as_str() {
        "create" => cmd_create(&a, mode),
        "info" => cmd_info(&a, mode),
        "map" => cmd_map(&a, mode),
        "check" => return cmd_check(&a, mode),
        "resize" => cmd_resize(&a, mode),
        "convert" => cmd_convert(&a, mode),
        "snapshot" => cmd_snapshot(&a, mode),
        "commit" => cmd_commit(&a, mode),
        "x-probe" => cmd_probe(&a, mode),
        _ => Err(format!("unknown command '{cmd}'\n{USAGE}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn one_file(a: &Args) -> Result<&str, String> {
    match a.pos.as_slice() {
        [f] => Ok(f),
        [] => Err("Expecting one image file name".into()),
        _ => Err(format!("Expecting one image file name, got {:?}", a.pos)),
    }
}

/// Opens one image (qcow2 or raw) without its backing chain.
fn open_top(path: &str, fmt: Option<Format>, writable: bool) -> Result<Layer, String> {
    let file = open_file(Path::new(path), writable).map_err(|e| e.to_string())?;
    let detected = image::detect(&file).map_err(|e| e.to_string())?;
    match fmt.unwrap_or(detected) {
        Format::Qcow2 if detected != Format::Qcow2 => {
            Err(format!("'{path}' is not a qcow2 image (no QFI\\xfb magic)"))
        }
        Format::Qcow2 => Ok(Layer::Qcow2 {
            img: Box::new(
                Qcow2::open(file, writable).map_err(|e| format!("Could not open '{path}': {e}"))?,
            ),
            backing: None,
        }),
        Format::Raw => {
            let size = file.metadata().map_err(|e| e.to_string())?.len();
            Ok(Layer::Raw { file, size })
        }
    }
}

fn cmd_create(a: &Args, mode: Mode) -> Result<(), String> {
    let fmt: Format = a
        .fmt
        .as_deref()
        .unwrap_or("raw")
        .parse()
        .map_err(|e: Error| e.to_string())?;
    let (path, size_arg) = match a.pos.as_slice() {
        [p] => (p.clone(), None),
        [p, s] => (p.clone(), Some(s.clone())),
        _ => return Err("Expecting image file name and size".into()),
    };
    let (bits, order) = cluster_bits(&a.opts)?;
    let mut opened = Vec::new();
    let mut size = match &size_arg {
        Some(s) => Some(parse_size(s).ok_or_else(|| {
            format!("Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes. ('{s}')")
        })?),
        None => None,
    };
    let backing = match &a.backing {
        None => None,
        Some(b) => {
            if fmt != Format::Qcow2 {
                return Err("Backing file not supported for file format 'raw'".into());
            }
            let bfmt: Format = a
                .backing_fmt
                .as_deref()
                .ok_or("Backing file specified without backing format (-F)")?
                .parse()
                .map_err(|e: Error| e.to_string())?;
            let bpath = image::resolve_backing(Path::new(&path), b);
            let layer = open_chain(&bpath, Some(bfmt), false, &mut opened)
                .map_err(|e| format!("Could not open backing file: {e}"))?;
            if size.is_none() {
                size = Some(layer.size());
            }
            Some((b.clone(), bfmt))
        }
    };
    let size = size.ok_or("Expecting image file name and size")?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("Could not create '{path}': {e}"))?;
    opened.push(PathBuf::from(&path));
    enter(&opened, mode)?;
    let mut line = format!("Formatting '{path}', fmt={fmt}");
    match fmt {
        Format::Raw => {
            line.push_str(&format!(" size={size}"));
            create_raw(&file, size).map_err(|e| e.to_string())?;
        }
        Format::Qcow2 => {
            line.push_str(&format!(
                " cluster_size={} extended_l2=off compression_type=zlib size={size}",
                1u64 << bits
            ));
            if let Some((b, f)) = &backing {
                line.push_str(&format!(" backing_file={b} backing_fmt={f}"));
            }
            line.push_str(&format!(" lazy_refcounts=off refcount_bits={}", 1 << order));
            let o = CreateOpts {
                size,
                cluster_bits: bits,
                refcount_order: order,
                backing,
            };
            create_qcow2(&file, &o).map_err(|e| e.to_string())?;
        }
    }
    file.sync_all().map_err(|e| e.to_string())?;
    println!("{line}");
    Ok(())
}

fn disk_size(l: &Layer) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let f = match l {
        Layer::Raw { file, .. } => file,
        Layer::Qcow2 { img, .. } => &img.file,
    };
    f.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
}

/// What cellvm's blk backend would do with this image, from block::header: None when
/// it serves it, else why not (read-write, read-only).
fn cellvm_verdict(l: &Layer) -> (Option<String>, Option<String>) {
    let Layer::Qcow2 { img, .. } = l else {
        return (None, None);
    };
    let len = img.file_len.min(block::header::HEADER_READ_MAX as u64) as usize;
    let mut first = vec![0u8; len];
    if let Err(e) = qcow2::read_exact_at(&img.file, &mut first, 0, "the header") {
        return (Some(e.to_string()), Some(e.to_string()));
    }
    match block::header::parse(&first) {
        Ok(h) => (h.refusal(true), h.refusal(false)),
        Err(e) => (Some(e.to_string()), Some(e.to_string())),
    }
}

fn cmd_info(a: &Args, mode: Mode) -> Result<(), String> {
    let path = one_file(a)?;
    let fmt = format_opt(&a.fmt).map_err(|e| e.to_string())?;
    let layer = open_top(path, fmt, false)?;
    enter(&[PathBuf::from(path)], mode)?;
    let actual = disk_size(&layer);
    let (rw, ro) = cellvm_verdict(&layer);
    let json = a.output.as_deref() == Some("json");
    match &layer {
        Layer::Raw { size, .. } => {
            if json {
                let v = json!({"virtual-size": size, "filename": path, "format": "raw",
                    "actual-size": actual, "dirty-flag": false});
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!(
                    "image: {path}\nfile format: raw\nvirtual size: {} ({size} bytes)\ndisk size: {}\n",
                    size_to_str(*size),
                    size_to_str(actual)
                );
            }
        }
        Layer::Qcow2 { img, .. } => {
            let h = &img.h;
            let compat = if h.version >= 3 { "1.1" } else { "0.10" };
            let ctype = if h.compression_type == 0 {
                "zlib"
            } else {
                "zstd"
            };
            if json {
                let mut data = json!({"compat": compat, "lazy-refcounts": h.compatible & 1 != 0,
                    "refcount-bits": 1u64 << h.refcount_order,
                    "corrupt": h.incompatible & qcow2::INCOMPAT_CORRUPT != 0,
                    "extended-l2": h.incompatible & qcow2::INCOMPAT_EXTL2 != 0});
                if h.version >= 3 {
                    data["compression-type"] = json!(ctype);
                }
                if h.crypt_method != 0 {
                    data["encrypt"] =
                        json!({"format": if h.crypt_method == 1 { "aes" } else { "luks" }});
                }
                if let Some(d) = &h.data_file {
                    data["data-file"] = json!(d);
                }
                if h.has_bitmaps {
                    data["bitmaps"] = json!([]);
                }
                let mut v = json!({"virtual-size": h.size, "filename": path, "cluster-size": h.cluster_size(),
                    "format": "qcow2", "actual-size": actual, "dirty-flag": h.incompatible & qcow2::INCOMPAT_DIRTY != 0,
                    "format-specific": {"type": "qcow2", "data": data}});
                if h.crypt_method != 0 {
                    v["encrypted"] = json!(true);
                }
                v["cellvm-refuses-read-write"] = json!(rw);
                v["cellvm-refuses-read-only"] = json!(ro);
                if let Some(b) = &h.backing {
                    v["backing-filename"] = json!(b);
                    v["full-backing-filename"] = json!(image::resolve_backing(Path::new(path), b)
                        .display()
                        .to_string());
                    if let Some(f) = &h.backing_format {
                        v["backing-filename-format"] = json!(f);
                    }
                }
                if !img.snapshots.is_empty() {
                    let list: Vec<Value> = img
                        .snapshots
                        .iter()
                        .map(|s| {
                            json!({"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
                            "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                            "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                            "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                            "icount": s.icount.unwrap_or(-1)})
                        })
                        .collect();
                    v["snapshots"] = Value::Array(list);
                }
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                let mut s = format!(
                    "image: {path}\nfile format: qcow2\nvirtual size: {} ({} bytes)\ndisk size: {}\ncluster_size: {}\n",
                    size_to_str(h.size),
                    h.size,
                    size_to_str(actual),
                    h.cluster_size()
                );
                if let Some(b) = &h.backing {
                    s.push_str(&format!("backing file: {b}\n"));
                    if let Some(f) = &h.backing_format {
                        s.push_str(&format!("backing file format: {f}\n"));
                    }
                }
                if h.crypt_method != 0 {
                    s.push_str("encrypted: yes\n");
                }
                if !img.snapshots.is_empty() {
                    s.push_str(&snapshot::list_text(&img.snapshots));
                }
                s.push_str(&format!(
                    "Format specific information:\n    compat: {compat}\n"
                ));
                if h.version >= 3 {
                    s.push_str(&format!("    compression type: {ctype}\n"));
                }
                s.push_str(&format!(
                    "    lazy refcounts: {}\n    refcount bits: {}\n    corrupt: {}\n    extended l2: {}\n",
                    h.compatible & 1 != 0,
                    1u64 << h.refcount_order,
                    h.incompatible & qcow2::INCOMPAT_CORRUPT != 0,
                    h.incompatible & qcow2::INCOMPAT_EXTL2 != 0
                ));
                if h.incompatible & qcow2::INCOMPAT_DIRTY != 0 {
                    s.push_str("    dirty: true\n");
                }
                s.push_str(&match (&rw, &ro) {
                    (None, _) => "cellvm serves it: read-write\n".to_string(),
                    (Some(w), None) => format!("cellvm serves it: read-only only ({w})\n"),
                    (Some(_), Some(r)) => format!("cellvm refuses it: {r}\n"),
                });
                print!("{s}");
            }
        }
    }
    Ok(())
}

fn cmd_map(a: &Args, mode: Mode) -> Result<(), String> {
    let path = one_file(a)?;
    let fmt = format_opt(&a.fmt).map_err(|e| e.to_string())?;
    let mut opened = Vec::new();
    let mut layer =
        open_chain(Path::new(path), fmt, false, &mut opened).map_err(|e| e.to_string())?;
    enter(&opened, mode)?;
    let size = layer.size();
    let mut ranges: Vec<(u64, u64, Status)> = Vec::new();
    let mut off = 0;
    while off < size {
        let (st, len) = layer
            .status(off, size - off, 0)
            .map_err(|e| e.to_string())?;
        let len = len.max(1);
        match ranges.last_mut() {
            Some((s, l, p))
                if p.depth == st.depth
                    && p.present == st.present
                    && p.zero == st.zero
                    && p.data == st.data
                    && match (p.offset, st.offset) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a + *l == b,
                        _ => false,
                    } =>
            {
                let _ = s;
                *l += len;
            }
            _ => ranges.push((off, len, st)),
        }
        off += len;
    }
    let mut out = std::io::stdout().lock();
    if a.output.as_deref() == Some("json") {
        let lines: Vec<String> = ranges
            .iter()
            .map(|(s, l, st)| {
                let mut line = format!(
                    "{{ \"start\": {s}, \"length\": {l}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}",
                    st.depth, st.present, st.zero, st.data
                );
                if let Some(o) = st.offset {
                    line.push_str(&format!(", \"offset\": {o}"));
                }
                line.push('}');
                line
            })
            .collect();
        let _ = writeln!(out, "[{}]", lines.join(",\n"));
    } else {
        let names: Vec<String> = opened.iter().map(|p| p.display().to_string()).collect();
        let _ = writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        );
        for (s, l, st) in &ranges {
            if let (true, Some(o)) = (st.data, st.offset) {
                let name = names.get(st.depth as usize).map_or("", String::as_str);
                let _ = writeln!(out, "{:<16}{:<16}{:<16}{name}", hex(*s), hex(*l), hex(o));
            }
        }
    }
    Ok(())
}

fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

fn cmd_check(a: &Args, mode: Mode) -> ExitCode {
    let path = match one_file(a) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let fmt = match format_opt(&a.fmt) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let mut layer = match open_top(path, fmt, false) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    if let Err(e) = enter(&[PathBuf::from(path)], mode) {
        return fail(e);
    }
    let Some(img) = layer.qcow2() else {
        return fail(format!(
            "This image format does not support checks ('{path}' is raw)"
        ));
    };
    let r = check(img);
    if a.output.as_deref() == Some("json") {
        print_check_json(path, &r);
    } else {
        print_check_human(&r);
    }
    ExitCode::from(r.exit_code() as u8)
}

fn print_check_json(path: &str, r: &CheckResult) {
    for m in &r.messages {
        eprintln!("{m}");
    }
    let mut v = json!({"image-end-offset": r.image_end_offset, "total-clusters": r.total_clusters,
        "check-errors": r.check_errors, "allocated-clusters": r.allocated,
        "filename": path, "format": "qcow2"});
    if r.leaks > 0 {
        v["leaks"] = json!(r.leaks);
    }
    if r.corruptions > 0 {
        v["corruptions"] = json!(r.corruptions);
    }
    if r.fragmented > 0 {
        v["fragmented-clusters"] = json!(r.fragmented);
    }
    if r.compressed > 0 {
        v["compressed-clusters"] = json!(r.compressed);
    }
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

fn print_check_human(r: &CheckResult) {
    for m in &r.messages {
        eprintln!("{m}");
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        println!("No errors were found on the image.");
    }
    if r.corruptions > 0 {
        println!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions
        );
    }
    if r.leaks > 0 {
        println!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
            r.leaks
        );
    }
    if r.check_errors > 0 {
        println!(
            "\n{} internal errors have occurred during the check.",
            r.check_errors
        );
    }
    if r.total_clusters > 0 {
        let pct = |n: u64| 100.0 * n as f64 / r.total_clusters as f64;
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated,
            r.total_clusters,
            pct(r.allocated),
            if r.allocated > 0 {
                100.0 * r.fragmented as f64 / r.allocated as f64
            } else {
                0.0
            },
            if r.allocated > 0 {
                100.0 * r.compressed as f64 / r.allocated as f64
            } else {
                0.0
            }
        );
    }
    println!("Image end offset: {}", r.image_end_offset);
}

fn cmd_resize(a: &Args, mode: Mode) -> Result<(), String> {
    let (path, arg) = match a.pos.as_slice() {
        [p, s] => (p.as_str(), s.as_str()),
        _ => return Err("Expecting image file name and size".into()),
    };
    let fmt = format_opt(&a.fmt).map_err(|e| e.to_string())?;
    let mut layer = open_top(path, fmt, true)?;
    enter(&[PathBuf::from(path)], mode)?;
    let cur = layer.size();
    let bad = || format!("Invalid image size specified: '{arg}'");
    let new = if let Some(s) = arg.strip_prefix('+') {
        cur.checked_add(parse_size(s).ok_or_else(bad)?)
            .ok_or_else(bad)?
    } else if let Some(s) = arg.strip_prefix('-') {
        cur.checked_sub(parse_size(s).ok_or_else(bad)?)
            .ok_or("Image size cannot be negative")?
    } else {
        parse_size(arg).ok_or_else(bad)?
    };
    match &mut layer {
        Layer::Raw { file, .. } => {
            if new < cur && !a.shrink {
                return Err("Use the --shrink option to perform a shrink operation.".into());
            }
            file.set_len(new).map_err(|e| e.to_string())?;
        }
        Layer::Qcow2 { img, .. } => {
            image::resize_qcow2(img, new, a.shrink).map_err(|e| e.to_string())?;
        }
    }
    println!("Image resized.");
    Ok(())
}

fn cmd_convert(a: &Args, mode: Mode) -> Result<(), String> {
    let (src, dst) = match a.pos.as_slice() {
        [s, d] => (s.as_str(), d.as_str()),
        _ => return Err("Expecting a source and a destination file name".into()),
    };
    let fmt = format_opt(&a.fmt).map_err(|e| e.to_string())?;
    let out: Format = a
        .out_fmt
        .as_deref()
        .unwrap_or("raw")
        .parse()
        .map_err(|e: Error| e.to_string())?;
    if a.compress && out != Format::Qcow2 {
        return Err("Compression not supported for this file format".into());
    }
    let (bits, order) = cluster_bits(&a.opts)?;
    let mut opened = Vec::new();
    let mut s = open_chain(Path::new(src), fmt, false, &mut opened).map_err(|e| e.to_string())?;
    s.check_readable().map_err(|e| format!("'{src}': {e}"))?;
    let size = s.size();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dst)
        .map_err(|e| format!("Could not create '{dst}': {e}"))?;
    opened.push(PathBuf::from(dst));
    enter(&opened, mode)?;
    let mut d = match out {
        Format::Raw => {
            create_raw(&file, size).map_err(|e| e.to_string())?;
            Layer::Raw { file, size }
        }
        Format::Qcow2 => {
            let o = CreateOpts {
                size,
                cluster_bits: bits,
                refcount_order: order,
                backing: None,
            };
            create_qcow2(&file, &o).map_err(|e| e.to_string())?;
            Layer::Qcow2 {
                img: Box::new(Qcow2::open(file, true).map_err(|e| e.to_string())?),
                backing: None,
            }
        }
    };
    copy_into(&mut s, &mut d, a.compress).map_err(|e| e.to_string())
}

fn cmd_snapshot(a: &Args, mode: Mode) -> Result<(), String> {
    let path = one_file(a)?;
    let (op, name) = a.snap.clone().unwrap_or(('l', None));
    let mut layer = open_top(path, Some(Format::Qcow2), op != 'l')?;
    enter(&[PathBuf::from(path)], mode)?;
    let img = layer.qcow2().ok_or("not a qcow2 image")?;
    let name = name.unwrap_or_default();
    let r = match op {
        'l' => {
            if !img.snapshots.is_empty() {
                print!("{}", snapshot::list_text(&img.snapshots));
            }
            Ok(())
        }
        'c' => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            snapshot::create(img, &name, (now.as_secs() as u32, now.subsec_nanos()))
        }
        'a' => snapshot::apply(img, &name),
        'd' => snapshot::delete(img, &name),
        _ => return Err("snapshot needs one of -l, -c, -a, -d".into()),
    };
    r.map_err(|e| e.to_string())
}

/// Commits a qcow2 overlay into its backing file (offline block-commit), then empties
/// the overlay unless `-d`: it is written anew, empty, over the same backing file, so it
/// reads exactly as before.
fn cmd_commit(a: &Args, mode: Mode) -> Result<(), String> {
    let path = one_file(a)?;
    let fmt = format_opt(&a.fmt).map_err(|e| e.to_string())?;
    if fmt == Some(Format::Raw) {
        return Err("commit needs a qcow2 overlay (a raw image has no backing file)".into());
    }
    let mut top = open_top(path, Some(Format::Qcow2), !a.keep)?;
    let img = top.qcow2().ok_or("not a qcow2 image")?;
    if let Some(why) = img.h.read_refusal() {
        return Err(format!("'{path}': {why}"));
    }
    let Some(name) = img.h.backing.clone() else {
        return Err(format!("'{path}' has no backing file to commit into"));
    };
    let Some(bfmt) = img.h.backing_format.clone() else {
        return Err(format!(
            "'{path}' names its backing file without a format (qemu-img rebase -u -F FMT)"
        ));
    };
    let bfmt: Format = bfmt.parse().map_err(|e: Error| e.to_string())?;
    if !a.keep && (img.h.nb_snapshots > 0 || img.h.version < 3) {
        return Err(format!(
            "'{path}' has internal snapshots or is qcow2 v2: emptying it is not implemented (commit -d keeps it)"
        ));
    }
    let bpath = image::resolve_backing(Path::new(path), &name);
    let mut opened = vec![PathBuf::from(path)];
    // The backing file is written; what lies below it is read.
    let mut backing =
        image::open_chain(&bpath, Some(bfmt), true, &mut opened).map_err(|e| e.to_string())?;
    backing
        .check_readable()
        .map_err(|e| format!("'{}': {e}", bpath.display()))?;
    enter(&opened, mode)?;
    let img = top.qcow2().ok_or("not a qcow2 image")?;
    image::commit(img, &mut backing).map_err(|e| e.to_string())?;
    if !a.keep {
        let o = CreateOpts {
            size: img.h.size,
            cluster_bits: img.h.cluster_bits,
            refcount_order: img.h.refcount_order,
            backing: Some((name, bfmt)),
        };
        create_qcow2(&img.file, &o).map_err(|e| format!("emptying '{path}': {e}"))?;
        img.file
            .sync_all()
            .map_err(|e| format!("emptying '{path}': {e}"))?;
    }
    println!("Image committed.");
    Ok(())
}

/// Hidden, for the sandbox test: opens FILE, enters the sandbox on it, then opens FILE
/// again and OTHER, printing what each open did.
fn cmd_probe(a: &Args, mode: Mode) -> Result<(), String> {
    let [named, other] = a.pos.as_slice() else {
        return Err("x-probe FILE OTHER".into());
    };
    let _f = open_file(Path::new(named), false).map_err(|e| e.to_string())?;
    enter(&[PathBuf::from(named)], mode)?;
    println!("sandbox: on ({mode:?})");
    let _ = std::io::stdout().flush();
    for p in [named, other] {
        match std::fs::File::open(p) {
            Ok(_) => println!("open {p}: ok"),
            Err(e) => println!("open {p}: {e}"),
        }
        let _ = std::io::stdout().flush();
    }
    Ok(())
}

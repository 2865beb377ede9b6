//! The answers built from the VM's shared status: `vm.info`, `vm.counters`, `vm.jobs`
//! (JSON) and `/metrics` (Prometheus text).
//!
//! The Prometheus text is written by hand: it is a handful of counters and gauges in a
//! line format of three rules (HELP/TYPE comments, `name{labels} value`, escaped label
//! values), and a client library would bring a registry, global state and a tree of
//! dependencies into the VMM's sandboxed process for no gain.

use std::fmt::Write;

use serde_json::{json, Map, Value};

use super::Response;
use crate::vmm::state::{State, Status};

pub fn info(s: &Status) -> Response {
    let (state, reason) = {
        let l = s.lifecycle();
        (l.state, l.reason)
    };
    let devices: Vec<Value> = s
        .devices
        .iter()
        .map(|d| json!({"id": d.id, "kind": d.kind, "pid": d.pid(), "state": d.state()}))
        .collect();
    let body = json!({
        "id": s.identity.id,
        "tenant": s.identity.tenant,
        "state": state.name(),
        "reason": reason.name(),
        "vcpus": s.vcpus,
        "memory_mib": s.memory_mib,
        "uptime_ms": s.started.elapsed().as_millis() as u64,
        "label": s.identity.label,
        "cgroup": s.identity.cgroup,
        "pid": std::process::id(),
        "devices": devices,
    });
    Response::json(200, body.to_string())
}

pub fn counters(s: &Status) -> Response {
    let paused = s.lifecycle().state == State::Paused;
    let vcpus: Vec<Value> = s
        .vcpu
        .iter()
        .map(|v| {
            let exits: Map<String, Value> = v
                .exits
                .snapshot()
                .into_iter()
                .map(|(k, n)| (k.to_string(), n.into()))
                .collect();
            let mut o = json!({"id": v.id, "exits": exits});
            // At the paused point each vCPU thread is parked with its descriptor and
            // reads its own registers on request.
            if paused {
                if let Some(Ok(rip)) = v.with_vcpu(|fd| fd.get_regs().map(|r| r.rip)) {
                    o["rip"] = format!("{rip:#x}").into();
                }
            }
            o
        })
        .collect();
    let devices: Vec<Value> = s
        .devices
        .iter()
        .map(|d| {
            let mut o = json!({"id": d.id, "kind": d.kind, "pid": d.pid(), "state": d.state()});
            for (k, n) in d.snapshot() {
                o[k] = n.into();
            }
            if let Some(page) = &d.backend {
                let counts: Map<String, Value> = page
                    .read()
                    .into_iter()
                    .map(|(k, n)| (k.to_string(), n.into()))
                    .collect();
                o["backend"] = counts.into();
            }
            o
        })
        .collect();
    let body = json!({
        "vcpus": vcpus,
        "devices": devices,
        "note": "a device's top-level counters are what the VMM sees: BAR and PCI config accesses (vCPU exits) and INTx raises it relays; with vhost-user the data path goes between the guest and the backend without the VMM, and `backend` holds what the backend reports of it (requests, errors, bytes) on the page it shares with the VMM",
    });
    Response::json(200, body.to_string())
}

pub fn jobs(s: &Status) -> Response {
    let jobs: Vec<Value> = s
        .lifecycle()
        .jobs
        .iter()
        .map(|j| {
            json!({
                "id": j.id,
                "kind": j.kind,
                "state": j.state,
                "elapsed_ms": j
                    .finished
                    .unwrap_or_else(std::time::Instant::now)
                    .duration_since(j.started)
                    .as_millis() as u64,
                "timeout_ms": j.timeout_ms,
            })
        })
        .collect();
    Response::json(200, json!({ "jobs": jobs }).to_string())
}

/// A label value with `\`, `"` and newlines escaped, as the text format wants.
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

pub fn metrics(s: &Status) -> Response {
    let mut t = String::new();
    let (state, reason) = {
        let l = s.lifecycle();
        (l.state, l.reason)
    };
    let id = label(s.identity.id.as_deref().unwrap_or(""));
    let tenant = label(s.identity.tenant.as_deref().unwrap_or(""));
    let _ = writeln!(t, "# HELP cellvm_vm_info The VM's identity; always 1.");
    let _ = writeln!(t, "# TYPE cellvm_vm_info gauge");
    let _ = writeln!(
        t,
        "cellvm_vm_info{{id=\"{id}\",tenant=\"{tenant}\",vcpus=\"{}\",memory_mib=\"{}\"}} 1",
        s.vcpus, s.memory_mib
    );
    let _ = writeln!(t, "# HELP cellvm_vm_state 1 for the VM's lifecycle state.");
    let _ = writeln!(t, "# TYPE cellvm_vm_state gauge");
    for st in [
        State::Created,
        State::Running,
        State::Paused,
        State::ShuttingDown,
        State::Ended,
    ] {
        let _ = writeln!(
            t,
            "cellvm_vm_state{{state=\"{}\",reason=\"{}\"}} {}",
            st.name(),
            if st == state { reason.name() } else { "" },
            u8::from(st == state)
        );
    }
    let _ = writeln!(
        t,
        "# HELP cellvm_uptime_seconds Seconds since the VM was built."
    );
    let _ = writeln!(t, "# TYPE cellvm_uptime_seconds gauge");
    let _ = writeln!(
        t,
        "cellvm_uptime_seconds {:.3}",
        s.started.elapsed().as_secs_f64()
    );
    let _ = writeln!(t, "# HELP cellvm_vcpu_exits_total vCPU exits by reason.");
    let _ = writeln!(t, "# TYPE cellvm_vcpu_exits_total counter");
    for v in &s.vcpu {
        for (reason, n) in v.exits.snapshot() {
            let _ = writeln!(
                t,
                "cellvm_vcpu_exits_total{{vcpu=\"{}\",reason=\"{reason}\"}} {n}",
                v.id
            );
        }
    }
    let _ = writeln!(
        t,
        "# HELP cellvm_device_events_total What the VMM sees of each device (BAR and config accesses, INTx raises)."
    );
    let _ = writeln!(t, "# TYPE cellvm_device_events_total counter");
    for d in &s.devices {
        for (what, n) in d.snapshot() {
            let _ = writeln!(
                t,
                "cellvm_device_events_total{{device=\"{}\",kind=\"{}\",event=\"{what}\"}} {n}",
                label(&d.id),
                d.kind
            );
        }
    }
    let _ = writeln!(
        t,
        "# HELP cellvm_device_backend_total What each device's backend reports of the data path (requests, errors, bytes to and from the guest)."
    );
    let _ = writeln!(t, "# TYPE cellvm_device_backend_total counter");
    for d in &s.devices {
        for (what, n) in d.backend.iter().flat_map(|p| p.read()) {
            let _ = writeln!(
                t,
                "cellvm_device_backend_total{{device=\"{}\",kind=\"{}\",counter=\"{what}\"}} {n}",
                label(&d.id),
                d.kind
            );
        }
    }
    let _ = writeln!(
        t,
        "# HELP cellvm_device_connected 1 while the device's backend connection is up."
    );
    let _ = writeln!(t, "# TYPE cellvm_device_connected gauge");
    for d in &s.devices {
        let _ = writeln!(
            t,
            "cellvm_device_connected{{device=\"{}\",kind=\"{}\"}} {}",
            label(&d.id),
            d.kind,
            u8::from(d.connected())
        );
    }
    Response::text(t)
}

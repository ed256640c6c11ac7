//! Client side of the host daemons' control API (adapter): find the hosts in the runtime
//! directory, find which one runs a VM, and orchestrate a migration (find the source,
//! prepare the target, migrate, undo the preparation if it fails). The CLI verbs and
//! `measure` call these; so can any other program.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::control::{self, ControlError};
use crate::host::api::{self, HostInfo, MigrateOptions, VmInfo};
use crate::migration::announce::Announce;
use crate::migration::{MigrationSummary, Progress};

/// Errors of the host client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot read the runtime directory {dir} (is any daemon running? set VFABRIC_RUN_DIR)"
    )]
    RunDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no host daemon answers in {dir} (start one with netns-scripts/up.sh or `vfabric host`; set VFABRIC_RUN_DIR if it runs elsewhere)")]
    NoHosts { dir: PathBuf },
    #[error("unknown host {name}: {}", known_hosts(.known))]
    UnknownHost { name: String, known: Vec<String> },
    #[error("no remote daemons")]
    Remotes {
        #[source]
        source: ControlError,
    },
    #[error("no running host has a VM named {0}")]
    NoSuchVm(String),
    #[error("{vm} already runs on {host}")]
    AlreadyThere { vm: String, host: String },
    #[error("host {host}")]
    Host {
        host: String,
        #[source]
        source: ControlError,
    },
    /// The source daemon died mid-migration.
    #[error("host {host} (the source) stopped answering during {phase}; {whereabouts}")]
    SourceLost {
        host: String,
        phase: String,
        whereabouts: String,
    },
}

fn known_hosts(known: &[String]) -> String {
    if known.is_empty() {
        "no host daemon is running".to_string()
    } else {
        format!("the known hosts are {}", known.join(", "))
    }
}

/// Every host daemon that answers in the runtime directory, and every remote daemon
/// ([`control::remotes`]), by name. Sockets of other daemons (the switch) and dead
/// sockets are skipped; a remote daemon that cannot be reached is an error (it was
/// named on purpose).
pub fn hosts() -> Result<Vec<HostInfo>, ClientError> {
    let dir = control::runtime_dir();
    let rd = std::fs::read_dir(&dir).map_err(|source| ClientError::RunDir {
        dir: dir.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let p = entry.path();
        if p.extension().and_then(|e| e.to_str()) != Some("sock") {
            continue;
        }
        if let Ok(info) = control::request(&p, api::Info {}) {
            out.push(info);
        }
    }
    let remotes = control::remotes().map_err(|source| ClientError::Remotes { source })?;
    for (name, addr) in remotes {
        if out.iter().any(|h| h.name == name) {
            continue;
        }
        let info = control::request(
            control::Endpoint::Remote {
                name: name.clone(),
                addr,
            },
            api::Info {},
        )
        .map_err(|source| ClientError::Host {
            host: name.clone(),
            source,
        })?;
        out.push(info);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// [`hosts`], but none is an error.
pub fn some_hosts() -> Result<Vec<HostInfo>, ClientError> {
    let h = hosts()?;
    if h.is_empty() {
        return Err(ClientError::NoHosts {
            dir: control::runtime_dir(),
        });
    }
    Ok(h)
}

/// Sends `req` to host `name`. A host without a socket is unknown: the error lists the
/// hosts that are.
pub fn call<R: control::Request>(name: &str, req: R) -> Result<R::Reply, ClientError> {
    let to = host_endpoint(name)?;
    control::request(to, req).map_err(|source| ClientError::Host {
        host: name.to_string(),
        source,
    })
}

/// Where host `name` is reached: a remote daemon of that name, or its socket here if
/// there is one.
fn host_endpoint(name: &str) -> Result<control::Endpoint, ClientError> {
    let valid = crate::names::validate("host", name).is_ok();
    let to = if valid {
        control::endpoint(name).map_err(|source| ClientError::Remotes { source })?
    } else {
        control::Endpoint::Local(control::socket_path(name))
    };
    let exists = match &to {
        control::Endpoint::Local(path) => path.exists(),
        control::Endpoint::Remote { .. } => true,
    };
    if !valid || !exists {
        let known = hosts()
            .map(|h| h.into_iter().map(|h| h.name).collect())
            .unwrap_or_default();
        return Err(ClientError::UnknownHost {
            name: name.to_string(),
            known,
        });
    }
    Ok(to)
}

/// Host `name`'s identity and capacity.
pub fn host_info(name: &str) -> Result<HostInfo, ClientError> {
    call(name, api::Info {})
}

/// The host that runs VM `name`.
pub fn locate(name: &str) -> Result<HostInfo, ClientError> {
    some_hosts()?
        .into_iter()
        .find(|h| h.vms.iter().any(|v| v == name))
        .ok_or_else(|| ClientError::NoSuchVm(name.to_string()))
}

/// One VM, wherever it runs.
pub fn vm_show(name: &str) -> Result<VmInfo, ClientError> {
    let h = locate(name)?;
    call(
        &h.name,
        api::VmShow {
            name: name.to_string(),
        },
    )
}

/// What to migrate where.
#[derive(Debug, Clone, Default)]
pub struct MigrationPlan {
    pub vm: String,
    pub to: String,
    /// How the target announces the VM, for this migration only (None: its setting).
    pub announce: Option<Announce>,
    pub options: MigrateOptions,
}

/// What the orchestration reports while it runs.
#[derive(Debug, Clone)]
pub enum Step {
    /// The source and target are known; the migration starts.
    Starting {
        from: String,
        to: String,
        vmotion: std::net::SocketAddr,
    },
    /// The source's engine reported progress.
    Progress(Progress),
}

/// A migration that went through.
#[derive(Debug, Clone)]
pub struct Migrated {
    pub summary: MigrationSummary,
    pub from: String,
    pub to: String,
}

/// Runs one migration: finds the source, prepares the target (announce choice, memory), asks the
/// source to migrate, and forgets the target's preparation if the migration fails.
pub fn migrate(
    plan: &MigrationPlan,
    mut on_step: impl FnMut(Step),
) -> Result<Migrated, ClientError> {
    let source = locate(&plan.vm)?;
    if source.name == plan.to {
        return Err(ClientError::AlreadyThere {
            vm: plan.vm.clone(),
            host: plan.to.clone(),
        });
    }
    let target = host_info(&plan.to)?;
    // The target maps and faults in the VM's memory now, before the stream (if it has
    // room), and records how to announce it: what it takes is off the migration's clock.
    let memory_mb = call(
        &source.name,
        api::VmShow {
            name: plan.vm.clone(),
        },
    )
    .ok()
    .map(|v| v.memory_mb);
    call(
        &target.name,
        api::PrepareIncoming {
            name: plan.vm.clone(),
            announce: plan.announce,
            memory_mb,
        },
    )?;
    // A listener bound to every address is reached on loopback.
    let mut addr = target.vmotion_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(Ipv4Addr::LOCALHOST.into());
    }
    on_step(Step::Starting {
        from: source.name.clone(),
        to: target.name.clone(),
        vmotion: addr,
    });
    let req = api::Migrate {
        name: plan.vm.clone(),
        target: target.name.clone(),
        target_addr: addr,
        options: plan.options.clone(),
    };
    let mut last: Option<Progress> = None;
    let result =
        control::request_with_progress(host_endpoint(&source.name)?, req, None, |p: Progress| {
            last = Some(p.clone());
            on_step(Step::Progress(p))
        })
        .map_err(|e| match e {
            // The source daemon died mid-migration: say which host, in which phase, and
            // where the VM is now, as far as the target can tell.
            ControlError::Closed | ControlError::Io(_) => ClientError::SourceLost {
                host: source.name.clone(),
                phase: phase_after(last.as_ref()),
                whereabouts: whereabouts(&plan.vm, &source.name, &target.name),
            },
            e => ClientError::Host {
                host: source.name.clone(),
                source: e,
            },
        });
    if result.is_err() {
        // The choices and the memory were for this migration only.
        let _ = call(
            &target.name,
            api::PrepareIncoming {
                name: plan.vm.clone(),
                announce: None,
                memory_mb: None,
            },
        );
    }
    Ok(Migrated {
        summary: result?,
        from: source.name,
        to: target.name,
    })
}

/// The phase a migration was in, from the last progress report received.
fn phase_after(last: Option<&Progress>) -> String {
    match last {
        None => "pre-check".into(),
        Some(Progress::Round { round, .. }) => format!("pre-copy (after round {round})"),
        Some(Progress::Quiesced { .. }) => "switch-over (quiesced, sending the bitmap)".into(),
        Some(Progress::Bitmap { .. }) => "switch-over (the target was pulling pages)".into(),
        Some(Progress::Pulled { .. }) => "switch-over (device state, resume)".into(),
        Some(Progress::Resumed { .. }) => "completion (the target had resumed the VM)".into(),
        #[allow(unreachable_patterns)]
        Some(_) => "an unknown phase".into(),
    }
}

/// Where a VM is after its source died: the target is asked (for a few seconds, while
/// it notices the broken stream) whether it runs the VM.
fn whereabouts(vm: &str, source: &str, target: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let Ok(to) = host_endpoint(target) else {
            return format!("{target} cannot be asked where {vm} is");
        };
        let shown = control::request(
            to,
            api::VmShow {
                name: vm.to_string(),
            },
        );
        match shown {
            Ok(v) => {
                return format!(
                    "{vm} runs on {target} ({}): the migration completed there",
                    v.state
                )
            }
            Err(ControlError::Remote(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(ControlError::Remote(_)) => {
                return format!(
                    "{vm} is not on {target} either: it was lost with {source} \
                     (pre-copy keeps the only running copy on the source)"
                )
            }
            Err(e) => return format!("{target} cannot be asked where {vm} is ({e})"),
        }
    }
}

//! Who this process is in a data-parallel run: its rank, the world size, its GPU on the node
//! (local rank) and where rank 0 serves the rendezvous. Taken, first found first:
//! 1. the flags `--rank`, `--world-size` (both, or neither), `--master-addr`, `--master-port`;
//! 2. torchrun's variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
//! 3. Slurm's, inside an `srun` step (SLURM_PROCID is set): SLURM_PROCID, SLURM_NTASKS,
//!    SLURM_LOCALID, the first host of SLURM_JOB_NODELIST (MASTER_ADDR overrides it) and
//!    MASTER_PORT, else a port derived from SLURM_JOB_ID so two jobs sharing a node do not meet;
//! 4. none of these: one process, rank 0 of 1.
//!
//! Every inconsistency is one line naming the flag or variable, exit code 2.

use crate::error::{Error, Result};

/// The rendezvous port when nothing names one (torchrun's default).
pub const DEFAULT_PORT: u16 = 29500;

/// Where the ranks came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Single,
    Flags,
    Torchrun,
    Slurm,
}

/// One process's place in a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranks {
    pub rank: usize,
    pub world: usize,
    /// Index of this process on its node: the GPU it takes.
    pub local_rank: usize,
    /// Rank 0's rendezvous address and port (None for a world of one).
    pub master: Option<(String, u16)>,
    pub source: Source,
}

/// The rank flags of `lewel pretrain`.
#[derive(Clone, Debug, Default)]
pub struct RankFlags {
    pub rank: Option<usize>,
    pub world_size: Option<usize>,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
}

impl Default for Ranks {
    fn default() -> Ranks {
        Ranks::single()
    }
}

impl Ranks {
    /// A single process.
    pub fn single() -> Ranks {
        Ranks {
            rank: 0,
            world: 1,
            local_rank: 0,
            master: None,
            source: Source::Single,
        }
    }

    /// One line for `lewel info`.
    pub fn describe(&self) -> String {
        let from = match self.source {
            Source::Single => {
                return "one process (no --rank/--world-size, torchrun or Slurm variables)".into()
            }
            Source::Flags => "flags",
            Source::Torchrun => "torchrun",
            Source::Slurm => "Slurm",
        };
        let meet = match &self.master {
            Some((a, p)) => format!(", rendezvous {a}:{p}"),
            None => String::new(),
        };
        format!(
            "{from}: rank {} of {}, local rank {}{meet}",
            self.rank, self.world, self.local_rank
        )
    }

    /// From the flags, else the environment `env` reads (`std::env::var` in the binary).
    pub fn resolve(flags: &RankFlags, env: &dyn Fn(&str) -> Option<String>) -> Result<Ranks> {
        let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let r = if flags.rank.is_some() || flags.world_size.is_some() {
            from_flags(flags, &get)?
        } else if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            from_torchrun(&get)?
        } else if get("SLURM_PROCID").is_some() {
            from_slurm(&get)?
        } else {
            if flags.master_addr.is_some() || flags.master_port.is_some() {
                return Err(Error::user(
                    "--master-addr/--master-port: given without --rank and --world-size",
                ));
            }
            Ranks::single()
        };
        Ok(r)
    }
}

/// The world must hold the rank and the local rank.
fn check(source: Source, rank: usize, world: usize, local_rank: usize) -> Result<()> {
    if world == 0 {
        return Err(Error::user(format!(
            "{}: the world size must be at least 1",
            what(source, "world")
        )));
    }
    if rank >= world {
        return Err(Error::user(format!(
            "{}: rank {rank} does not exist in a world of {world}",
            what(source, "rank")
        )));
    }
    if local_rank >= world {
        return Err(Error::user(format!(
            "{}: local rank {local_rank} in a world of {world}",
            what(source, "local")
        )));
    }
    Ok(())
}

/// The flag or variable an error names.
fn what(s: Source, field: &str) -> &'static str {
    match (s, field) {
        (Source::Flags, "rank") => "--rank",
        (Source::Flags, _) => "--world-size",
        (Source::Torchrun, "rank") => "RANK",
        (Source::Torchrun, "local") => "LOCAL_RANK",
        (Source::Torchrun, _) => "WORLD_SIZE",
        (Source::Slurm, "rank") => "SLURM_PROCID",
        (Source::Slurm, "local") => "SLURM_LOCALID",
        (Source::Slurm, _) => "SLURM_NTASKS",
        (Source::Single, _) => "the world",
    }
}

fn number(name: &str, v: &str) -> Result<usize> {
    v.trim()
        .parse()
        .map_err(|_| Error::user(format!("{name}: expected a whole number, got '{v}'")))
}

fn port(name: &str, v: &str) -> Result<u16> {
    match v.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Error::user(format!(
            "{name}: expected a port in 1..65535, got '{v}'"
        ))),
    }
}

fn from_flags(f: &RankFlags, get: &dyn Fn(&str) -> Option<String>) -> Result<Ranks> {
    let (Some(rank), Some(world)) = (f.rank, f.world_size) else {
        return Err(Error::user(
            "--rank and --world-size: give both (or neither, to take them from torchrun or Slurm)",
        ));
    };
    // With the flags, one node is assumed: the GPU is the rank's index (--device cuda:N picks
    // another; across nodes, torchrun or Slurm say which).
    let local_rank = rank;
    check(Source::Flags, rank, world, local_rank)?;
    let master = if world > 1 {
        let addr = match (&f.master_addr, get("MASTER_ADDR")) {
            (Some(a), _) => a.clone(),
            (None, Some(a)) => a,
            (None, None) => {
                return Err(Error::user(format!(
                    "--world-size {world}: no rendezvous address: pass --master-addr (rank 0's host) and --master-port"
                )))
            }
        };
        let p = match (f.master_port, get("MASTER_PORT")) {
            (Some(p), _) => p,
            (None, Some(p)) => port("MASTER_PORT", &p)?,
            (None, None) => {
                return Err(Error::user(format!(
                    "--world-size {world}: no rendezvous port: pass --master-port"
                )))
            }
        };
        Some((addr, p))
    } else {
        None
    };
    Ok(Ranks {
        rank,
        world,
        local_rank,
        master,
        source: Source::Flags,
    })
}

fn from_torchrun(get: &dyn Fn(&str) -> Option<String>) -> Result<Ranks> {
    let need = |k: &str| {
        get(k).ok_or_else(|| {
            Error::user(format!(
                "{k} is not set, but {} is: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT",
                if k == "RANK" { "WORLD_SIZE" } else { "RANK" }
            ))
        })
    };
    let rank = number("RANK", &need("RANK")?)?;
    let world = number("WORLD_SIZE", &need("WORLD_SIZE")?)?;
    let local_rank = match get("LOCAL_RANK") {
        Some(v) => number("LOCAL_RANK", &v)?,
        None if world == 1 => 0,
        None => {
            return Err(Error::user(
                "LOCAL_RANK is not set (RANK and WORLD_SIZE are): it picks this process's GPU",
            ))
        }
    };
    check(Source::Torchrun, rank, world, local_rank)?;
    let master = if world > 1 {
        let addr = get("MASTER_ADDR").ok_or_else(|| {
            Error::user(format!(
                "MASTER_ADDR is not set: WORLD_SIZE {world} needs rank 0's address"
            ))
        })?;
        let p = get("MASTER_PORT").ok_or_else(|| {
            Error::user(format!(
                "MASTER_PORT is not set: WORLD_SIZE {world} needs rank 0's port"
            ))
        })?;
        Some((addr, port("MASTER_PORT", &p)?))
    } else {
        None
    };
    Ok(Ranks {
        rank,
        world,
        local_rank,
        master,
        source: Source::Torchrun,
    })
}

fn from_slurm(get: &dyn Fn(&str) -> Option<String>) -> Result<Ranks> {
    let rank = number("SLURM_PROCID", &get("SLURM_PROCID").unwrap_or_default())?;
    let world = match get("SLURM_NTASKS").or_else(|| get("SLURM_NPROCS")) {
        Some(v) => number("SLURM_NTASKS", &v)?,
        None => {
            return Err(Error::user(
                "SLURM_NTASKS is not set (SLURM_PROCID is): run lewel under srun with --ntasks",
            ))
        }
    };
    let local_rank = match get("SLURM_LOCALID") {
        Some(v) => number("SLURM_LOCALID", &v)?,
        None => 0,
    };
    check(Source::Slurm, rank, world, local_rank)?;
    let master = if world > 1 {
        let addr = match get("MASTER_ADDR") {
            Some(a) => a,
            None => {
                let list = get("SLURM_JOB_NODELIST")
                    .or_else(|| get("SLURM_NODELIST"))
                    .ok_or_else(|| {
                        Error::user(
                            "SLURM_JOB_NODELIST is not set: set MASTER_ADDR to rank 0's host",
                        )
                    })?;
                first_host(&list).ok_or_else(|| {
                    Error::user(format!(
                        "SLURM_JOB_NODELIST '{list}': no host name in it; set MASTER_ADDR to rank 0's host"
                    ))
                })?
            }
        };
        let p = match (get("MASTER_PORT"), get("SLURM_JOB_ID")) {
            (Some(p), _) => port("MASTER_PORT", &p)?,
            // Jobs sharing a node meet on different ports; every rank of one job derives the same.
            (None, Some(id)) => match id.trim().parse::<u64>() {
                Ok(id) => 20000 + (id % 20000) as u16,
                Err(_) => DEFAULT_PORT,
            },
            (None, None) => DEFAULT_PORT,
        };
        Some((addr, p))
    } else {
        None
    };
    Ok(Ranks {
        rank,
        world,
        local_rank,
        master,
        source: Source::Slurm,
    })
}

/// The first host of a Slurm node list: `node[01-04,07],gpu3` -> `node01`, `a,b` -> `a`,
/// `rack1-n[3,5]` -> `rack1-n3` (zero padding kept).
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    // The first entry: up to the first comma outside brackets.
    let mut depth = 0;
    let mut end = list.len();
    for (i, ch) in list.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let entry = &list[..end];
    let host = match entry.find('[') {
        None => entry.to_string(),
        Some(open) => {
            let close = entry[open..].find(']')? + open;
            let first = entry[open + 1..close].split(',').next()?;
            let first = first.split('-').next()?;
            if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            format!("{}{first}{}", &entry[..open], &entry[close + 1..])
        }
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        let m: HashMap<&str, &str> = vars.iter().copied().collect();
        move |k: &str| m.get(k).map(|v| v.to_string())
    }

    fn resolve(flags: &RankFlags, vars: &[(&str, &str)]) -> Result<Ranks> {
        Ranks::resolve(flags, &env(vars))
    }

    fn flags(rank: usize, world: usize) -> RankFlags {
        RankFlags {
            rank: Some(rank),
            world_size: Some(world),
            ..Default::default()
        }
    }

    #[test]
    fn nothing_set_is_one_process() {
        assert_eq!(
            resolve(&RankFlags::default(), &[]).unwrap(),
            Ranks::single()
        );
        // salloc sets SLURM_NTASKS without SLURM_PROCID: not an srun step.
        let r = resolve(&RankFlags::default(), &[("SLURM_NTASKS", "4")]).unwrap();
        assert_eq!(r, Ranks::single());
    }

    #[test]
    fn flags_first_then_torchrun_then_slurm() {
        let torchrun = [
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
            ("MASTER_ADDR", "n0"),
            ("MASTER_PORT", "29400"),
        ];
        let slurm = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[07-10]"),
            ("SLURM_JOB_ID", "123456"),
        ];
        let mut f = flags(1, 2);
        f.master_addr = Some("10.0.0.1".into());
        f.master_port = Some(1234);
        let all: Vec<_> = torchrun.iter().chain(&slurm).copied().collect();
        let r = resolve(&f, &all).unwrap();
        assert_eq!(
            (r.rank, r.world, r.source, r.master),
            (1, 2, Source::Flags, Some(("10.0.0.1".into(), 1234)))
        );
        let r = resolve(&RankFlags::default(), &all).unwrap();
        assert_eq!(
            r,
            Ranks {
                rank: 3,
                world: 8,
                local_rank: 3,
                master: Some(("n0".into(), 29400)),
                source: Source::Torchrun
            }
        );
        let r = resolve(&RankFlags::default(), &slurm).unwrap();
        assert_eq!(
            r,
            Ranks {
                rank: 5,
                world: 16,
                local_rank: 1,
                master: Some(("gpu07".into(), 20000 + (123456 % 20000) as u16)),
                source: Source::Slurm
            }
        );
        // MASTER_ADDR and MASTER_PORT override Slurm's.
        let mut s2 = slurm.to_vec();
        s2.extend([("MASTER_ADDR", "head"), ("MASTER_PORT", "4000")]);
        let r = resolve(&RankFlags::default(), &s2).unwrap();
        assert_eq!(r.master, Some(("head".into(), 4000)));
    }

    #[test]
    fn flags_take_the_master_from_the_environment() {
        let r = resolve(
            &flags(0, 2),
            &[("MASTER_ADDR", "h"), ("MASTER_PORT", "7000")],
        )
        .unwrap();
        assert_eq!(r.master, Some(("h".into(), 7000)));
        // A world of one needs no rendezvous.
        assert_eq!(resolve(&flags(0, 1), &[]).unwrap().master, None);
    }

    #[test]
    fn bad_input_is_one_line_naming_the_flag_or_variable() {
        type Case<'a> = (RankFlags, Vec<(&'a str, &'a str)>, &'a str);
        let cases: Vec<Case> = vec![
            (
                RankFlags {
                    rank: Some(1),
                    ..Default::default()
                },
                vec![],
                "--rank and --world-size: give both",
            ),
            (
                flags(2, 2),
                vec![],
                "--rank: rank 2 does not exist in a world of 2",
            ),
            (
                flags(0, 0),
                vec![],
                "--world-size: the world size must be at least 1",
            ),
            (flags(0, 2), vec![], "--world-size 2: no rendezvous address"),
            (
                flags(0, 2),
                vec![("MASTER_ADDR", "h")],
                "--world-size 2: no rendezvous port",
            ),
            (
                RankFlags {
                    master_port: Some(5),
                    ..Default::default()
                },
                vec![],
                "--master-addr/--master-port: given without --rank and --world-size",
            ),
            (
                RankFlags::default(),
                vec![("RANK", "0")],
                "WORLD_SIZE is not set, but RANK is",
            ),
            (
                RankFlags::default(),
                vec![("RANK", "x"), ("WORLD_SIZE", "2")],
                "RANK: expected a whole number, got 'x'",
            ),
            (
                RankFlags::default(),
                vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")],
                "MASTER_ADDR is not set: WORLD_SIZE 2",
            ),
            (
                RankFlags::default(),
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "0"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "99999"),
                ],
                "MASTER_PORT: expected a port in 1..65535, got '99999'",
            ),
            (
                RankFlags::default(),
                vec![("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
                "LOCAL_RANK is not set",
            ),
            (
                RankFlags::default(),
                vec![("SLURM_PROCID", "0")],
                "SLURM_NTASKS is not set",
            ),
            (
                RankFlags::default(),
                vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")],
                "SLURM_JOB_NODELIST is not set",
            ),
            (
                RankFlags::default(),
                vec![
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_JOB_NODELIST", "[]"),
                ],
                "SLURM_JOB_NODELIST '[]': no host name in it",
            ),
            (
                RankFlags::default(),
                vec![("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")],
                "SLURM_PROCID: rank 4 does not exist in a world of 4",
            ),
        ];
        for (f, vars, want) in cases {
            let e = resolve(&f, &vars).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with(want),
                "{vars:?}: got '{msg}', want '{want}...'"
            );
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn first_host_of_slurm_node_lists() {
        for (list, want) in [
            ("node01", Some("node01")),
            ("node[01-04,07],gpu3", Some("node01")),
            ("a,b", Some("a")),
            ("rack1-n[3,5]", Some("rack1-n3")),
            ("gpu[007-010]", Some("gpu007")),
            ("x[2-3]-ib", Some("x2-ib")),
            ("[]", None),
            ("n[a-b]", None),
            ("", None),
        ] {
            assert_eq!(first_host(list).as_deref(), want, "{list}");
        }
    }
}

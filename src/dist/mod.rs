//! Data-parallel training across processes (one per GPU), across nodes: who each process is
//! ([`ranks`]: flags, torchrun or Slurm) and how they meet ([`rendezvous`]: rank 0 serves the
//! communicator's id over TCP). The communicator over NCCL, the launcher (`--gpus N`) and SyncBN
//! build on these (issue 17).

pub mod local;
pub mod ranks;
pub mod rendezvous;

//! Data-parallel training across processes (one per GPU), across nodes: who each process is
//! ([`ranks`]: flags, torchrun or Slurm), how they meet ([`rendezvous`]: rank 0 serves the
//! communicator's id over TCP), the NCCL communicator and its watchdog ([`nccl`]), `--gpus N`
//! ([`launch`]: one worker per GPU), and ranks as threads on the CPU ([`local`]: the reference the
//! GPU path is held to). SyncBN and bucketed all-reduce build on these (issue 17).

pub mod launch;
pub mod local;
pub mod nccl;
pub mod ranks;
pub mod rendezvous;

//! The model tests that `LUMEN_TEST_DEVICE` / `LUMEN_TEST_DTYPE` move to a
//! GPU (tests/common), in one test binary: layout parity with transformers,
//! synthesis parity with diffusers (images within 3/255 in f32, the stated
//! f16 and bf16 tolerances), the f16 time embedding, and sizes that must not
//! step together. Built only with `--features device-tests` (so CI does not
//! run these twice): scripts/gpu_pack.sh builds it with `cuda` and carries it
//! to a GPU machine, where scripts/gpu_check.sh runs it with
//! `LUMEN_TEST_ROOT` pointing at the checkout.
//!
//! Each file brings its own `mod common`, as it does when built alone.
#![allow(clippy::duplicate_mod)]

#[path = "layout_parity.rs"]
mod layout_parity;
#[path = "step_batching.rs"]
mod step_batching;
#[path = "synthesis_parity.rs"]
mod synthesis_parity;

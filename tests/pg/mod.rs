//! The test PostgreSQL helpers now live in `tests/e2e/common/pg.rs` (as `common::pg` of the
//! `e2e` test binary). This file stays only for `benches/load.rs`, which includes it with
//! `#[path = "../tests/pg/mod.rs"]`.

#[path = "../e2e/common/pg.rs"]
mod shared;

pub(crate) use shared::*;

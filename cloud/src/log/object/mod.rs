//! The log on object storage, its metadata in PostgreSQL (`docs/object-log.md`): being
//! built. So far the object format.

pub(crate) mod format;

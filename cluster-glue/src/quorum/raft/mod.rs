//! The embedded backend: openraft (being built).

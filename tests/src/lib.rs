//! Test-only tools shared by Ferry's end-to-end tests.

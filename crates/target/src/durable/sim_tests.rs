//! Power-cut simulation tests (see durable::sim).

//! ringblk-blockmap: the lock-free redirect-on-write lookup table of a delta image
//! (logical chunk -> physical chunk in the delta). See ARCHITECTURE.md §4.

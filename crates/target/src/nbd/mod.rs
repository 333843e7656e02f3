//! Sans-IO NBD protocol: bytes in, events and replies out. No sockets here.

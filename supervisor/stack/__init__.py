"""A running stack: the launcher, embedded servers, credentials, the sandbox and the runtime file."""

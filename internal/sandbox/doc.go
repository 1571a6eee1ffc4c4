// Package sandbox confines a vTPM instance process. It is pure Go (no cgo):
// seccomp and Landlock are driven through their system calls.
//
// An instance is confined in two steps:
//
//  1. Enter, first thing in the process: no_new_privs, and a Landlock domain
//     that allows writing only beneath the TPM's state directory and to its
//     generation record (no other file of the data root), creating and
//     removing its sockets and pid file, and binding
//     only the TCP ports it was told to listen on. Landlock restricts the
//     calling thread, and a Go program has several threads from its first
//     instruction, so Enter restricts all of them in place: with the
//     kernel's LANDLOCK_RESTRICT_SELF_TSYNC (Landlock ABI 8, Linux 7.0), else
//     by having every thread restrict itself (an AllThreadsFunc: Go's
//     syscall.AllThreadsSyscall, or the cgo program's own, UseAllThreads),
//     threads started meanwhile included. Where neither works (a kernel with
//     signal scoping but without the fix that lets sibling domains signal
//     each other), it restricts one locked thread and re-executes the
//     program from it, which costs a second program start: the new image,
//     and every thread it ever starts, is born inside the domain. The
//     process is then made non-dumpable.
//  2. Seal, once the sockets exist, the state is open and the pid file is
//     written: a seccomp allow-list installed on every thread at once
//     (SECCOMP_FILTER_FLAG_TSYNC). From then on the process cannot create
//     network sockets, connect, bind, execute programs, fork, trace, change
//     credentials or map executable memory.
//
// Key material is kept in Locked memory (package secret): mlock'd, excluded
// from core dumps, wiped on Close. KeyMemory applies the isolation policy to
// key memory that could not be locked.
//
// An isolation policy says what happens when the host lacks a part:
// "required" refuses to run and names what is missing and how to fix it;
// "preferred" logs a warning and runs with what there is; "none" skips the
// sandbox (for debugging only).
package sandbox

// Package qmp is vtpm's client of the QEMU Machine Protocol: one session on
// a QEMU monitor socket, commands matched to their replies by id, and every
// asynchronous event kept, so a caller can wait for an event that arrived
// before it asked while other commands run.
//
// It is written here rather than taken from github.com/digitalocean/go-qemu
// (package qmp), which was weighed for it and falls short of what VM
// start/stop, the tests and host-to-host migration need:
//
//   - an error reply keeps only its description (errors.New(desc)): the
//     class (CommandNotFound, DeviceNotFound, GenericError…) that errors are
//     classified by is lost;
//   - Run takes no context and the connection no deadline: a QEMU that stops
//     answering hangs the caller;
//   - events reach a listener through one unbuffered channel fed by the
//     goroutine that also delivers replies, so a listener that is not
//     draining events blocks every command, and events that arrive before
//     Events is called are dropped (a migration's or a boot's STOP cannot be
//     waited for after the fact);
//   - a session is made only by dialling (or by accepting one connection on
//     a listener it makes, without cancellation), not on a connection the
//     caller accepted, which the test harness needs so that QEMU connects to
//     it and no event is lost;
//   - replies longer than 64 KiB end the session silently (bufio.Scanner's
//     default limit).
//
// The typed helpers cover what vtpm uses: system_powerdown, quit,
// query-status, query-version, query-block, query-block-jobs, migrate,
// migrate-set-capabilities, query-migrate (with its statistics) and
// add-fd, which passes a descriptor over the socket (SCM_RIGHTS);
// [Conn.Execute] runs any other command (blockdev-mirror, block-job-cancel,
// nbd-server-start, object-add).
package qmp

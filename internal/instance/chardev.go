package instance

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"vtpm/internal/swtpm"
)

// openChardev prepares swtpm chardev's data channel: the character device
// named by --chardev (opened before privileges are dropped, as swtpm does),
// or the descriptor --fd names, which must not be a file, a directory or a
// block device.
func (in *Instance) openChardev() error {
	if in.opts.Device != "" {
		f, err := os.OpenFile(in.opts.Device, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("--chardev: %w", err)
		}
		in.chardev = f
		return nil
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(in.opts.DataFD, &st); err != nil {
		return fmt.Errorf("--fd %d: %w", in.opts.DataFD, err)
	}
	switch st.Mode & syscall.S_IFMT {
	case syscall.S_IFREG, syscall.S_IFDIR, syscall.S_IFBLK, syscall.S_IFLNK:
		return fmt.Errorf("--fd %d is a file, directory or block device; give a character device or a socket", in.opts.DataFD)
	}
	in.chardev = os.NewFile(uintptr(in.opts.DataFD), "--fd")
	return nil
}

// serveChardev answers TPM commands on the chardev channel, one command per
// read and one response per write, until it hangs up; then the TPM ends.
func (in *Instance) serveChardev(f *os.File) {
	defer func() {
		in.log.Info("data channel hung up; terminating")
		in.finish(nil)
	}()
	r := swtpm.NewChardevReader(f)
	for {
		req, err := r.Read()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrClosed) {
				in.log.Debug("chardev read", "err", err)
			}
			return
		}
		rsp := in.process(req)
		if req.Prefixed {
			rsp = swtpm.WrapResponse(rsp)
		}
		if _, err := f.Write(rsp); err != nil {
			in.log.Debug("chardev write", "err", err)
			return
		}
	}
}

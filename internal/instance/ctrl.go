package instance

import (
	"net"

	"vtpm/internal/libtpms"
	"vtpm/internal/swtpm"
	"vtpm/internal/swtpm/statefile"
	"vtpm/internal/tpmrc"
)

// handleCtrl executes one control command. The returned func, if any, runs
// after the response has been written (CMD_SHUTDOWN exits only then).
func (in *Instance) handleCtrl(req *swtpm.Request) (rsp []byte, after func()) {
	in.idle.command()
	if req.FD != nil && req.Cmd != swtpm.CmdSetDataFD {
		req.FD.Close()
		req.FD = nil
	}
	running := in.tpm.Running()
	if req.Malformed {
		if swtpm.NeedsRunning(req.Cmd) && !running {
			return swtpm.Result(tpmrc.TPMBadOrdinal), nil
		}
		return swtpm.Result(tpmrc.TPMBadParameter), nil
	}
	needRunning := func() []byte {
		if !running {
			return swtpm.Result(tpmrc.TPMBadOrdinal)
		}
		return nil
	}
	switch req.Cmd {
	case swtpm.CmdGetCapability:
		return swtpm.U32s(uint32(swtpm.Capabilities>>32), uint32(swtpm.Capabilities)), nil

	case swtpm.CmdInit:
		in.sealing.dropAdopter()
		in.stopTPM()
		if err := in.tpm.Init(); err != nil {
			in.log.Error("CMD_INIT failed", "err", err)
			return swtpm.Result(tpmrc.Of(err)), nil
		}
		if req.U32(0)&swtpm.InitFlagDeleteVolatile != 0 {
			if err := in.store.Delete(libtpms.Volatile.Name(), false); err != nil {
				in.log.Warn("delete volatile state", "err", err)
			}
		}
		return swtpm.Result(tpmrc.TPMSuccess), nil

	case swtpm.CmdShutdown:
		in.stopTPM()
		return swtpm.Result(tpmrc.TPMSuccess), func() { in.finish(nil) }

	case swtpm.CmdStop:
		in.stopTPM()
		return swtpm.Result(tpmrc.TPMSuccess), nil

	case swtpm.CmdGetTPMEstablished:
		if r := needRunning(); r != nil {
			return r, nil
		}
		est, err := in.tpm.Established()
		if err != nil {
			return swtpm.Result(tpmrc.Of(err)), nil
		}
		bit := uint32(0)
		if est {
			bit = 1 << 24 // ptm_est: a u8 bit followed by 3 pad bytes
		}
		return swtpm.U32s(0, bit), nil

	case swtpm.CmdSetLocality:
		loc := req.Body[0]
		if loc > 4 || (loc == 4 && in.opts.RejectLoc4) {
			return swtpm.Result(tpmrc.TPMBadLocality), nil
		}
		in.tpm.SetLocality(loc)
		return swtpm.Result(tpmrc.TPMSuccess), nil

	case swtpm.CmdResetTPMEstablished:
		if r := needRunning(); r != nil {
			return r, nil
		}
		loc := req.Body[0]
		if loc > 4 {
			return swtpm.Result(tpmrc.TPMBadLocality), nil
		}
		old := in.tpm.Locality()
		in.tpm.SetLocality(loc)
		err := in.tpm.ResetEstablished()
		in.tpm.SetLocality(old)
		return swtpm.Result(tpmrc.Of(err)), nil

	case swtpm.CmdHashStart, swtpm.CmdHashData, swtpm.CmdHashEnd:
		if r := needRunning(); r != nil {
			return r, nil
		}
		var err error
		switch req.Cmd {
		case swtpm.CmdHashStart:
			err = in.tpm.HashStart()
		case swtpm.CmdHashData:
			err = in.tpm.HashData(req.Blob)
		default:
			err = in.tpm.HashEnd()
		}
		return swtpm.Result(tpmrc.Of(err)), nil

	case swtpm.CmdCancelTPMCmd:
		if r := needRunning(); r != nil {
			return r, nil
		}
		in.tpm.Cancel()
		return swtpm.Result(tpmrc.TPMSuccess), nil

	case swtpm.CmdStoreVolatile:
		if r := needRunning(); r != nil {
			return r, nil
		}
		v, err := in.tpm.VolatileAllStore()
		if err == nil {
			err = in.store.Store(libtpms.Volatile.Name(), v)
			clear(v)
		}
		if err != nil {
			in.log.Error("CMD_STORE_VOLATILE failed", "err", err)
		}
		return swtpm.Result(tpmrc.Of(err)), nil

	case swtpm.CmdGetStateBlob:
		if r := needRunning(); r != nil {
			return r, nil
		}
		return in.getStateBlob(req.U32(0), req.U32(1), req.U32(2)), nil

	case swtpm.CmdSetStateBlob:
		if running {
			return swtpm.Result(tpmrc.TPMBadOrdinal), nil
		}
		return in.setStateBlob(req.U32(0), req.U32(1), req.Blob), nil

	case swtpm.CmdGetConfig:
		var flags uint32
		if in.fileKey != nil {
			flags |= swtpm.ConfigFlagFileKey
		}
		if in.migKey != nil {
			flags |= swtpm.ConfigFlagMigrationKey
		}
		return swtpm.U32s(0, flags), nil

	case swtpm.CmdSetDataFD:
		return in.setDataFD(req), nil

	case swtpm.CmdSetBufferSize:
		wanted := req.U32(0)
		if wanted > 0 && running {
			return swtpm.Result(tpmrc.TPMBadOrdinal), nil
		}
		size, lo, hi := in.tpm.SetBufferSize(wanted)
		return swtpm.U32s(0, size, lo, hi), nil

	case swtpm.CmdGetInfo:
		flags := uint64(req.U32(0))<<32 | uint64(req.U32(1))
		offset := req.U32(2)
		info, err := in.tpm.GetInfo(uint32(flags))
		if err != nil {
			return swtpm.Result(tpmrc.Of(err)), nil
		}
		data := append([]byte(info), 0)
		if int(offset) >= len(info) {
			return swtpm.Result(tpmrc.TPMBadParameter), nil
		}
		chunk := data[offset:]
		if len(chunk) > swtpm.MaxInfoChunk {
			chunk = chunk[:swtpm.MaxInfoChunk]
		}
		return append(swtpm.U32s(0, uint32(len(data)), uint32(len(chunk))), chunk...), nil
	}
	return swtpm.Result(tpmrc.TPMBadOrdinal), nil
}

var blobTypes = map[uint32]libtpms.StateType{
	swtpm.BlobPermanent: libtpms.Permanent,
	swtpm.BlobVolatile:  libtpms.Volatile,
	swtpm.BlobSaveState: libtpms.SaveState,
}

func (in *Instance) getStateBlob(flags, typ, offset uint32) []byte {
	var plain []byte
	var err error
	switch typ {
	case swtpm.BlobPermanent:
		plain, err = in.tpm.GetState(libtpms.Permanent)
	case swtpm.BlobVolatile:
		// Like swtpm, a volatile blob handed out for migration is not kept.
		plain, err = in.tpm.VolatileAllStore()
		if err == nil {
			if derr := in.store.Delete(libtpms.Volatile.Name(), false); derr != nil {
				in.log.Warn("delete volatile state", "err", derr)
			}
		}
	case swtpm.BlobSaveState:
		return swtpm.U32s(uint32(tpmrc.TPMRetry), 0, 0, 0) // TPM 2.0 has no savestate
	default:
		return swtpm.Result(tpmrc.TPMFail)
	}
	if err != nil {
		in.log.Error("CMD_GET_STATEBLOB failed", "type", typ, "err", err)
		return swtpm.Result(tpmrc.Of(err))
	}
	blob, sflags, err := statefile.EncodeMigration(plain, in.fileKey, in.migKey, flags&swtpm.StateFlagDecrypted != 0)
	clear(plain)
	if err == nil && typ == swtpm.BlobPermanent {
		blob, err = in.withAdoptRecord(blob)
	}
	if err != nil {
		in.log.Error("CMD_GET_STATEBLOB: encode", "err", err)
		return swtpm.Result(tpmrc.Of(err))
	}
	if int(offset) > len(blob) {
		offset = uint32(len(blob))
	}
	rest := blob[offset:]
	return append(swtpm.U32s(0, sflags, uint32(len(rest)), uint32(len(rest))), rest...)
}

func (in *Instance) setStateBlob(flags, typ uint32, blob []byte) []byte {
	st, ok := blobTypes[typ]
	if !ok {
		return swtpm.Result(tpmrc.TPMFail)
	}
	if len(blob) == 0 {
		switch st {
		case libtpms.SaveState:
			// swtpm clears only the savestate slot, which TPM 2 never
			// reads; SetState(nil) would drop every cached blob, losing
			// the permanent and volatile state loaded just before (as
			// swtpm_ioctl --load of all three saved types does).
			return swtpm.Result(tpmrc.TPMSuccess)
		case libtpms.Volatile:
			// swtpm forgets only the volatile blob. libtpms can only drop
			// every cached blob, so the permanent one (cached, or read
			// from the store) is put back.
			perm, perr := in.tpm.GetState(libtpms.Permanent)
			if err := in.tpm.SetState(st, nil); err != nil {
				return swtpm.Result(tpmrc.Of(err))
			}
			if perr == nil && len(perm) > 0 {
				err := in.tpm.SetState(libtpms.Permanent, perm)
				clear(perm)
				return swtpm.Result(tpmrc.Of(err))
			}
			return swtpm.Result(tpmrc.TPMSuccess)
		}
		return swtpm.Result(tpmrc.Of(in.tpm.SetState(st, nil)))
	}
	if st == libtpms.Permanent {
		var err error
		if blob, err = in.adoptFromBlob(blob); err != nil {
			in.logAdoptError(err)
			return swtpm.Result(tpmrc.Of(err))
		}
	}
	plain, err := statefile.DecodeMigration(blob, flags, in.fileKey, in.migKey)
	if err != nil {
		in.log.Error("CMD_SET_STATEBLOB rejected the blob", "type", typ, "err", err)
		return swtpm.Result(tpmrc.Of(err))
	}
	err = in.tpm.SetState(st, plain)
	clear(plain)
	if err != nil {
		in.log.Error("CMD_SET_STATEBLOB: libtpms refused the state", "type", typ, "err", err)
	}
	return swtpm.Result(tpmrc.Of(err))
}

func (in *Instance) setDataFD(req *swtpm.Request) []byte {
	if in.opts.Ctrl == nil || in.opts.Ctrl.Type != "unixio" {
		if req.FD != nil {
			req.FD.Close()
		}
		return swtpm.Result(tpmrc.TPMBadOrdinal)
	}
	// As swtpm, a data channel from --server, --fd or chardev counts as
	// set even while no client is connected.
	in.mu.Lock()
	busy := in.dataConn != nil || in.opts.Server != nil || in.opts.DataFD >= 0 || in.opts.Chardev
	in.mu.Unlock()
	if busy {
		if req.FD != nil {
			req.FD.Close()
		}
		return swtpm.Result(tpmrc.TPMIOError)
	}
	if req.FD == nil {
		return swtpm.Result(tpmrc.TPMBadParameter)
	}
	conn, err := net.FileConn(req.FD)
	req.FD.Close()
	if err != nil {
		return swtpm.Result(tpmrc.TPMBadParameter)
	}
	in.setData(conn)
	go in.serveData(conn, false, in.opts.Terminate)
	return swtpm.Result(tpmrc.TPMSuccess)
}

package main

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/paths"
	"vtpm/internal/vm"
)

// vmRegistry is this host's VMs, under the data root.
func vmRegistry() *vm.Registry {
	h := vm.NewRegistry(paths.DataRoot(), openBroker)
	h.Log = warnLogger()
	return h
}

func vmCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "vm",
		Short: "Create, start, clone and template VMs with vTPMs",
		Long: `A VM is a bundle directory: vm.json (name, UUID, OS profile, firmware, Secure
Boot, disks, TPM), its UEFI variable store, its disk and tpm/ (the vTPM's sealed
state). Bundles are made under <data root>/vms, or anywhere with --path, and
listed in the data root's registry; VMs are named by name or UUID.`,
	}
	cmd.AddCommand(vmCreateCmd(), onOtherHosts(vmListCmd(), "hosts"), vmShowCmd(), vmRegisterCmd(), vmUnregisterCmd(), vmDeleteCmd(),
		vmStartCmd(), vmStopCmd(), vmCloneCmd(), vmTemplateCmd(), onOtherHosts(vmDeployCmd(), "on"), vmMoveCmd(), vmCopyToCmd())
	// Across hosts: performed by the host service's client, vtpm-hostd.
	cmd.AddCommand(forwardCmd(hostHelper, "migrate VM --to HOST [--grant] [--json]", "Move a VM to a trusted host: live when it runs, offline otherwise"))
	return cmd
}

func printNotes(w io.Writer, notes []string) {
	for _, n := range notes {
		fmt.Fprintln(w, n)
	}
}

func vmCreateCmd() *cobra.Command {
	var (
		o                vm.CreateOptions
		osName, firmware string
		tpm, asJSON      bool
		keyService       string
	)
	cmd := &cobra.Command{
		Use:   "create NAME --os windows11|windows10|windows-server|linux|other",
		Short: "Create a VM bundle (UEFI variable store, disk, and a vTPM when asked or required)",
		Long: `Create a VM bundle under the data root (or --path) and register it.

--os windows11 gets UEFI, Secure Boot and a manufactured vTPM; asking for it
with BIOS firmware or without a TPM is refused. --tpm gives other profiles a
vTPM, which turns Secure Boot on (OVMF's Secure Boot firmware, with Microsoft's
keys enrolled in the variable store). A TPM needs UEFI, and a VM booting from a
passthrough disk or physical partition cannot have one.

The disk is a new qcow2 image of --disk-size (20G), or an existing image or
block device (--disk; a block device is a passthrough disk). --kernel/--initrd
boot a kernel directly through the firmware (measured and Secure Boot still
apply).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.Name = args[0]
			var err error
			if osName != "" {
				if o.OS, err = vm.ParseOS(osName); err != nil {
					return err
				}
			}
			if firmware != "" {
				if o.Firmware, err = vm.ParseFirmware(firmware); err != nil {
					return err
				}
			}
			if cmd.Flags().Changed("tpm") {
				o.TPM = &tpm
			}
			// The fleet guardian is fetched first: a key service that
			// cannot be reached leaves no VM behind.
			var fleet *guardian.Guardian
			if keyService != "" {
				if fleet, err = fleetGuardian(keyService); err != nil {
					return err
				}
			}
			res, err := vmRegistry().Create(o)
			if err != nil {
				return err
			}
			if fleet != nil {
				if !res.VM.Config.HasTPM() {
					return errdefs.New(errdefs.ErrInvalidArgument, "VM %s was created without a TPM: --key-service grants the fleet guardian a TPM's key (add --tpm)", o.Name)
				}
				p, err := grantFleet(res.VM.TPMDir(), fleet)
				if err != nil {
					return fmt.Errorf("VM %s was created, but the fleet guardian was not granted its TPM: %w", o.Name, err)
				}
				res.Notes = append(res.Notes, fmt.Sprintf("granted the key service's fleet guardian %s (protector version %d)", fleet.Name(), p.Version()))
			}
			return emit(cmd, asJSON, vmRegistry().Summary(res.VM), func(w io.Writer) {
				c := res.VM.Config
				fmt.Fprintf(w, "created VM %s (%s) in %s: %s, %s, Secure Boot %s, TPM %s\n",
					c.Name, c.UUID, res.VM.Dir, c.OS, c.Firmware, c.SecureBootStatus(), c.TPMStatus())
				printNotes(w, res.Notes)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&osName, "os", "", "guest OS profile: windows11, windows10, windows-server, linux or other")
	f.StringVar(&firmware, "firmware", "", "uefi (default) or bios")
	f.BoolVar(&tpm, "tpm", false, "give the VM a manufactured vTPM (default: only for windows11)")
	f.StringVar(&o.Disk, "disk", "", "existing disk image or block device to boot from")
	f.StringVar(&o.DiskSize, "disk-size", "", "size of a new qcow2 disk (default 20G)")
	f.BoolVar(&o.NoDisk, "no-disk", false, "no disk (e.g. with --kernel and --initrd)")
	f.StringArrayVar(&o.Passthrough, "passthrough-disk", nil, "host block device handed to the guest as is (repeatable)")
	f.StringVar(&o.Memory, "memory", "", "guest RAM, QEMU syntax (default 4G for Windows, 1G otherwise)")
	f.IntVar(&o.CPUs, "cpus", 0, "virtual CPUs (default 2 for Windows, 1 otherwise)")
	f.StringVar(&o.Kernel, "kernel", "", "kernel for direct boot")
	f.StringVar(&o.Initrd, "initrd", "", "initramfs for direct boot")
	f.StringVar(&o.Append, "append", "", "kernel command line (console=ttyS0 is added)")
	f.StringVar(&o.Isolation, "isolation", "", "isolation the vTPM process must have: required (default: refuse to start without it) or preferred")
	f.StringVar(&o.Path, "path", "", "bundle directory (default <data root>/vms/NAME)")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	f.StringVar(&keyService, "key-service", "", "grant the TPM to the fleet guardian of the key service at these URLs (comma-separated), so attested hosts of the fleet can open it")
	return cmd
}

// openVM opens the VM ref names in this host's registry.
func openVM(ref string) (*vm.Registry, *vm.VM, error) {
	h := vmRegistry()
	v, err := h.Open(ref)
	return h, v, err
}

// onVM is a command's run function that acts on the VM its first argument
// names.
func onVM(run func(cmd *cobra.Command, h *vm.Registry, v *vm.VM) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		h, v, err := openVM(args[0])
		if err != nil {
			return err
		}
		return run(cmd, h, v)
	}
}

func vmListCmd() *cobra.Command {
	var all, asJSON bool
	cmd := &cobra.Command{
		Use:   "list [-a]",
		Short: "List running VMs (-a: all registered VMs and templates) with state, firmware, Secure Boot and TPM",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rows, err := vmRegistry().List(all)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), rows)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, strings.Join(vm.ListColumns, "\t"))
			for _, r := range rows {
				fmt.Fprintln(tw, strings.Join(r.Row(), "\t"))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, r := range rows {
				if r.Error != "" {
					fmt.Fprintf(cmd.ErrOrStderr(), "%s: %s\n", r.Name, r.Error)
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVarP(&all, "all", "a", false, "include stopped VMs, templates and broken bundles")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func vmShowCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "show VM",
		Short: "Show a VM's bundle, settings and state",
		Args:  cobra.ExactArgs(1),
		RunE: onVM(func(cmd *cobra.Command, h *vm.Registry, v *vm.VM) error {
			j := h.Summary(v)
			return emit(cmd, asJSON, map[string]any{"vm": j, "config": v.Config}, func(w io.Writer) { v.WriteText(w, j.State) })
		}),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func vmRegisterCmd() *cobra.Command {
	var name string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "register PATH [--name NAME]",
		Short: "Register a bundle copied in from elsewhere",
		Long: `Register the bundle at PATH (copied from another host, or restored) on this
host. Its TPM opens only if one of its key protector's guardians is held here;
` + "`vtpm vm start`" + ` says which guardians could open it and how to import one.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			h := vmRegistry()
			v, err := h.Register(args[0], name)
			if err != nil {
				return err
			}
			return emit(cmd, asJSON, h.Summary(v), func(w io.Writer) {
				fmt.Fprintf(w, "registered VM %s (%s) at %s\n", v.Name(), v.Config.UUID, v.Dir)
			})
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "register under this name (renames the VM)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func vmUnregisterCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "unregister VM",
		Short: "Forget a VM on this host; its bundle stays where it is",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			e, err := vmRegistry().Unregister(args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "unregistered VM %s; its bundle is still at %s\n", e.Name, e.Path)
			return nil
		},
	}
}

func vmDeleteCmd() *cobra.Command {
	var deleteTPM, purge, yes bool
	cmd := &cobra.Command{
		Use:   "delete VM [--delete-tpm|--purge-backup [--yes]]",
		Short: "Delete a stopped VM's bundle, keeping a backup of its TPM state unless --delete-tpm",
		Long: `Delete what vtpm made in a stopped VM's bundle (vm.json, the UEFI variable
store, the disks inside the bundle, logs) and unregister it. Its TPM state is
moved to a backup under the data root, unless --delete-tpm, which asks first on
a terminal (--yes confirms for scripts). Files vtpm did not make stay, and with
them the bundle directory; disks outside the bundle are left alone.
--purge-backup then removes every backup of its TPM state kept under the data
root (asking first, as --delete-tpm does); for a VM that moved to another host,
and so is no longer registered here, it removes the backup the move kept.`,
		Args: cobra.ExactArgs(1),
		RunE: onVM(func(cmd *cobra.Command, h *vm.Registry, v *vm.VM) error {
			if deleteTPM && v.Config.HasTPM() {
				q := fmt.Sprintf("delete the TPM state of VM %s for good (secrets sealed to it, such as BitLocker and LUKS keys, are lost)", v.Name())
				if err := confirm(cmd.InOrStdin(), cmd.ErrOrStderr(), q, yes); err != nil {
					return err
				}
			}
			del, err := h.Delete(v, deleteTPM)
			if err != nil {
				return err
			}
			del.WriteText(cmd.OutOrStdout())
			return nil
		}),
	}
	cmd.Flags().BoolVar(&deleteTPM, "delete-tpm", false, "delete the TPM state too: secrets sealed to it (BitLocker, LUKS) are gone for good")
	cmd.Flags().BoolVar(&purge, "purge-backup", false, "also remove the backups of its TPM state kept under the data root (a moved VM's too)")
	cmd.Flags().BoolVarP(&yes, "yes", "y", false, "confirm --delete-tpm or --purge-backup without asking")
	withPurge(cmd, &purge, &yes)
	return cmd
}

func vmStartCmd() *cobra.Command {
	var o vm.StartOptions
	cmd := &cobra.Command{
		Use:   "start VM [--console] [--serial-socket PATH]",
		Short: "Start a VM: pre-flight checks, its vTPM instance, then QEMU (headless)",
		Long: `Check everything first — the TPM's key opens on this host, the isolation the
VM's policy requires is available, firmware, variable store, kernel and disks
exist — and explain every failure; then start the vTPM instance on the bundle's
sealed state and QEMU with OVMF (Secure Boot firmware when the VM has it) and
tpm-crb or tpm-tis. KVM is used when /dev/kvm works, else software emulation
(--accel or $VTPM_ACCEL chooses).

Headless by default: the serial console goes to logs/serial.log in the bundle,
and to a unix socket with --serial-socket. --console puts it on this terminal
and returns when the VM stops (Ctrl-C stops the VM).`,
		Args: cobra.ExactArgs(1),
		RunE: onVM(func(cmd *cobra.Command, h *vm.Registry, v *vm.VM) error {
			o.Stdin, o.Stdout, o.Stderr = os.Stdin, cmd.OutOrStdout(), cmd.ErrOrStderr()
			res, err := h.Start(cmd.Context(), v, o)
			if err != nil {
				return err
			}
			if o.Console {
				fmt.Fprintf(cmd.ErrOrStderr(), "VM %s stopped\n", v.Name())
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "started VM %s (QEMU pid %d, %s, %s); serial console: %s\n",
				v.Name(), res.QEMUPid, res.TPM(), res.Accel, res.SerialLog)
			return nil
		}),
	}
	cmd.Flags().BoolVar(&o.Console, "console", false, "serial console on this terminal; wait until the VM stops")
	cmd.Flags().StringVar(&o.SerialSocket, "serial-socket", "", "also expose the serial console on this unix socket")
	cmd.Flags().StringVar(&o.Accel, "accel", "", "kvm or tcg (default: kvm when usable)")
	return cmd
}

func vmStopCmd() *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "stop VM [--timeout 60s]",
		Short: "Shut a VM down (ACPI power button, then quit after --timeout); its vTPM persists its state and exits",
		Args:  cobra.ExactArgs(1),
		RunE: onVM(func(cmd *cobra.Command, h *vm.Registry, v *vm.VM) error {
			res, err := h.Stop(cmd.Context(), v, timeout)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "stopped VM %s: %s; TPM state persisted\n", v.Name(), res.How())
			return nil
		}),
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 60*time.Second, "how long the guest gets to power off before QEMU quits (0: quit at once)")
	return cmd
}

func vmCloneCmd() *cobra.Command {
	var mode string
	cmd := vmCopyCmd(&cobra.Command{
		Use:   "clone SRC NEW [--tpm new|copy|none]",
		Short: "Copy a stopped VM under a new name and UUID, with a new, copied or no TPM",
		Long: `--tpm new (default) manufactures a fresh vTPM: a new identity, EK and
certificates. --tpm copy keeps the TPM's contents (so secrets sealed in the
source unseal in the clone) under a new data key and TPM UUID, and the two VMs
then share one EK. --tpm none leaves the clone without a TPM.`,
	}, "cloned {src} into", func(h *vm.Registry, src *vm.VM, name, path string) (*vm.Created, error) {
		m, _ := vm.ParseTPMMode(mode) // checked before the source is opened
		return h.Clone(src, name, m, path)
	})
	cmd.PreRunE = func(*cobra.Command, []string) error {
		_, err := vm.ParseTPMMode(mode)
		return err
	}
	cmd.Flags().StringVar(&mode, "tpm", "new", "the clone's TPM: new, copy or none")
	return cmd
}

func printCreated(cmd *cobra.Command, h *vm.Registry, res *vm.Created, err error, verb string, asJSON bool) error {
	if err != nil {
		return err
	}
	j := struct {
		vm.Summary
		Notes []string         `json:"notes"`
		Next  []errdefs.Remedy `json:"next,omitempty"`
	}{h.Summary(res.VM), slices.Concat(res.Notes, res.Warnings), res.Next}
	return emit(cmd, asJSON, j, func(w io.Writer) {
		c := res.VM.Config
		fmt.Fprintf(w, "%s %s (%s) in %s; TPM %s\n", verb, c.Name, c.UUID, res.VM.Dir, c.TPMStatus())
		printNotes(cmd.ErrOrStderr(), res.Warnings)
		printNotes(w, res.Notes)
		for _, r := range res.Next {
			fmt.Fprintln(w, renderRemedy(r))
		}
	})
}

func vmTemplateCmd() *cobra.Command {
	return vmCopyCmd(&cobra.Command{
		Use:   "template SRC NAME",
		Short: "Make a template of a stopped VM: its bundle without TPM secrets, marked \"TPM required\" if it had one",
	}, "made template", (*vm.Registry).Template)
}

func vmDeployCmd() *cobra.Command {
	return vmCopyCmd(&cobra.Command{
		Use:   "deploy TEMPLATE NEW",
		Short: "Create a VM from a template, with a freshly manufactured vTPM when the template requires one",
	}, "deployed", (*vm.Registry).Deploy)
}

// vmCopyCmd completes c, a command that makes a VM (its last argument) from
// another (its first) with do, and prints it as made by verb ({src} is the
// other's name).
func vmCopyCmd(c *cobra.Command, verb string, do func(h *vm.Registry, src *vm.VM, name, path string) (*vm.Created, error)) *cobra.Command {
	var path string
	var asJSON bool
	c.Args = cobra.ExactArgs(2)
	c.RunE = func(cmd *cobra.Command, args []string) error {
		h, src, err := openVM(args[0])
		if err != nil {
			return err
		}
		res, err := do(h, src, args[1], path)
		return printCreated(cmd, h, res, err, strings.ReplaceAll(verb, "{src}", src.Name()), asJSON)
	}
	c.Flags().StringVar(&path, "path", "", "bundle directory (default <data root>/vms/"+strings.Fields(c.Use)[2]+")")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

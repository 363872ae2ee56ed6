//go:build unix && !linux

package registry

import "syscall"

// sysProcAttr puts the registry in its own process group (no parent-death
// signal outside Linux).
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

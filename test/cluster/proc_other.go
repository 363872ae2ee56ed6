//go:build unix && !linux

package cluster

import "syscall"

// sysProcAttr puts a child in its own process group (no parent-death signal
// outside Linux; the reaper still covers our own children).
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// registerEnvPIDs is Linux-only (it reads /proc).
func (c *Cluster) registerEnvPIDs() {}

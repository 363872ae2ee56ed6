package cluster

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// sysProcAttr puts a child in its own process group and has the kernel
// SIGKILL it when we die.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// registerEnvPIDs finds the etcd and kube-apiserver processes envtest
// started for this cluster (our children whose command line mentions the
// cluster's temp dir) and hands their process groups to the reaper.
func (c *Cluster) registerEnvPIDs() {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	me := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		ppid, pgid, ok := procStat(pid)
		if !ok || ppid != me {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(cmdline), c.tmpDir) {
			continue
		}
		argv0, _, _ := strings.Cut(string(cmdline), "\x00")
		name := filepath.Base(argv0)
		if name != "etcd" && name != "kube-apiserver" {
			continue
		}
		c.mu.Lock()
		c.envPIDs[name] = pid
		c.mu.Unlock()
		c.reaper.add(pgid)
	}
}

// procStat returns the parent pid and process group of pid.
func procStat(pid int) (ppid, pgid int, ok bool) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, false
	}
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(s[i+1:]) // state ppid pgrp ...
	if len(f) < 3 {
		return 0, 0, false
	}
	ppid, err1 := strconv.Atoi(f[1])
	pgid, err2 := strconv.Atoi(f[2])
	return ppid, pgid, err1 == nil && err2 == nil
}

package cluster

import (
	"os"
	"time"
)

// abandonForTest kills every process of the cluster the way a dying test
// process loses them (SIGKILL, no cleanup of the real node's containers,
// mounts, chains or bridge) and releases the machine lock, as the kernel
// does for a dead process.
func (c *Cluster) abandonForTest() {
	c.mu.Lock()
	procs := append([]*proc(nil), c.procs...)
	c.mu.Unlock()
	for _, p := range procs {
		_ = p.kill(10 * time.Second)
	}
	if c.Env != nil {
		_ = c.Env.Stop()
	}
	if c.reaper != nil {
		c.reaper.finish(true)
	}
	_ = c.stopEgress() // in-process: it would die with the test process
	if c.real != nil && c.real.lock != nil {
		_ = c.real.lock.Close()
	}
	c.real = nil
	c.closeEnvLogs()
	_ = os.RemoveAll(c.tmpDir)
	c.stopOnce.Do(func() {})
}

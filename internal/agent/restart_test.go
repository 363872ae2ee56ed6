package agent

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	. "github.com/onsi/gomega"
)

// TestRestartUnderLoad restarts the agent's datapath three times while a
// client in an enrolled namespace opens connections to the service as fast
// as it can (2000 connections, at most 10 s): each restart closes every Go
// handle without unpinning (what SIGTERM does), waits, and loads again,
// adopting the pins; the second one also replaces the programs (link
// update). No connection may escape redirection (reach the service's
// server) or fail. It runs on an idle kernel and on a kube node with
// conntrack active (see nodeEnv).
func TestRestartUnderLoad(t *testing.T) {
	requirePrivileged(t)
	for _, env := range nodeEnvs {
		t.Run(env.name, func(t *testing.T) { testRestartUnderLoad(t, env) })
	}
}

func testRestartUnderLoad(t *testing.T, env nodeEnv) {
	g := NewWithT(t)
	env.setUp(t)
	ns := newTestNetns(t)
	server := env.addService(t, ns)
	dp, cfg := loadTestDatapath(t, capturePort)
	pod := PodRef{Namespace: "shop", Name: "busy", UID: "7f0c2a8e-51d4-4c55-8f39-8f2c1d9e6a01"}
	enroller, err := NewEnroller(dp, "", testr.New(t))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(enroller.EnrollPath(pod, ns.Path)).To(Succeed())
	cookie := ns.Cookie(t)
	startStandInProxy(t, ns, captureAddr)

	const (
		total   = 6000 // enough that the load outlasts three restarts of the whole datapath
		workers = 4
		budget  = 10 * time.Second
	)
	var started, ok, escaped, failed atomic.Int64
	var firstErr atomic.Value
	deadline := time.Now().Add(budget)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = ns.Do(func() {
				for time.Now().Before(deadline) && started.Add(1) <= total {
					c, err := net.DialTimeout("tcp4", serviceAddr, 2*time.Second)
					if err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, errBox{err})
						continue
					}
					reply, err := readReply(c)
					peer := c.RemoteAddr().String()
					c.Close()
					switch {
					case err != nil:
						failed.Add(1)
						firstErr.CompareAndSwap(nil, errBox{err})
					case reply != "orig "+serviceAddr || peer != serviceAddr:
						escaped.Add(1)
						firstErr.CompareAndSwap(nil, errBox{errors.New("reply " + reply + ", peer " + peer)})
					default:
						ok.Add(1)
					}
				}
			})
		}()
	}

	waitFor := func(n int64) {
		for ok.Load()+failed.Load()+escaped.Load() < n && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
	restart := func(force bool) (LoadReport, map[string]uint64) {
		before := dp.ProgramIDs()
		g.Expect(dp.Close()).To(Succeed())
		time.Sleep(50 * time.Millisecond) // the agent is down: nothing holds a handle
		cfg.ForceReplace = force
		var report LoadReport
		var err error
		dp, report, err = LoadDatapath(cfg)
		g.Expect(err).NotTo(HaveOccurred())
		t.Cleanup(func() { dp.Close() })
		// The new agent adopts what is enrolled and keeps it.
		enroller, err = NewEnroller(dp, "", testr.New(t))
		g.Expect(err).NotTo(HaveOccurred())
		enroller.Want(pod)
		enroller.Reconcile()
		g.Expect(enroller.Cookies(pod.UID)).To(ConsistOf(cookie))
		after := dp.ProgramIDs()
		changed := map[string]uint64{}
		for name, id := range after {
			if before[name] != id {
				changed[name] = uint64(id)
			}
		}
		return report, changed
	}

	waitFor(300)
	report, changed := restart(false)
	g.Expect(report.AdoptedMaps).To(HaveLen(len(dp.Maps())))
	for name, action := range report.Links {
		g.Expect(action).To(Equal(LinkAdopted), "restart 1: %s", name)
	}
	g.Expect(changed).To(BeEmpty(), "identical programs are kept")

	waitFor(900)
	report, changed = restart(true)
	for name, action := range report.Links {
		g.Expect(action).To(Equal(LinkUpdated), "restart 2: %s", name)
	}
	g.Expect(changed).To(HaveLen(len(attachments)), "every program replaced in place")

	waitFor(1500)
	atRestart3 := ok.Load()
	report, _ = restart(false)
	for name, action := range report.Links {
		g.Expect(action).To(Equal(LinkAdopted), "restart 3: %s", name)
	}

	wg.Wait()
	t.Logf("%d connections: %d ok, %d escaped, %d failed, %d after the last restart", ok.Load()+escaped.Load()+failed.Load(), ok.Load(), escaped.Load(), failed.Load(), ok.Load()-atRestart3)
	if e := firstErr.Load(); e != nil {
		t.Logf("first error: %v", e)
	}
	g.Expect(escaped.Load()).To(BeZero(), "connections that escaped redirection")
	g.Expect(server.Accepted()).To(BeZero(), "connections that reached the service's server around the proxy")
	g.Expect(failed.Load()).To(BeZero(), "connections that failed")
	g.Expect(ok.Load()).To(BeNumerically(">", atRestart3), "traffic continued after the last restart")
	g.Expect(ok.Load()).To(BeNumerically(">=", 1600), "the load ran through all restarts")
}

// errBox gives every error stored in an atomic.Value the same type.
type errBox struct{ error }

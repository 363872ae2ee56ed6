package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/go-logr/logr"
	. "github.com/onsi/gomega"
	"golang.org/x/sys/unix"

	"github.com/meshkeeper/meshkeeper/internal/agent/cni"
)

// The test binary doubles as the plugin: the runtime's side of the test
// runs it with the CNI environment, as containerd runs the real one.
func TestMain(m *testing.M) {
	if os.Getenv("MESHKEEPER_TEST_AS_CNI_PLUGIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// podNetns makes a network namespace bind-mounted at a temporary path (the
// plugin refuses its own namespace as CNI_NETNS, as the spec wants).
func podNetns(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("MESHKEEPER_REQUIRE_PRIVILEGED") == "1" {
			t.Fatal("needs root for a network namespace (MESHKEEPER_REQUIRE_PRIVILEGED=1)")
		}
		t.Skip("needs root for a network namespace; set MESHKEEPER_REQUIRE_PRIVILEGED=1 to fail instead")
	}
	path := filepath.Join(t.TempDir(), "netns")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies in the new namespace
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- unix.Mount("/proc/thread-self/ns/net", path, "", unix.MS_BIND, "")
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			t.Error(err)
		}
	})
	return path
}

const prevResult = `{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mac":"0a:58:0a:d5:00:0c","sandbox":"/x"}],"ips":[{"address":"10.213.0.12/24","gateway":"10.213.0.1","interface":0}],"dns":{}}`

func runPlugin(t *testing.T, command, netns, socket string) (stdout string, err error) {
	t.Helper()
	conf := `{"cniVersion":"1.0.0","name":"meshkeeper-test","type":"meshkeeper-cni","socket":"` + socket + `","timeout":"2s","excludeNamespaces":["kube-system"],"prevResult":` + prevResult + `}`
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "MESHKEEPER_TEST_AS_CNI_PLUGIN=1",
		"CNI_COMMAND="+command, "CNI_CONTAINERID=sandbox-1", "CNI_NETNS="+netns, "CNI_IFNAME=eth0", "CNI_PATH=/nonexistent",
		"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=sandbox-1;K8S_POD_UID=6c5d4e3f-2a1b-4c9d-8e7f-0a1b2c3d4e5f")
	cmd.Stdin = bytes.NewBufferString(conf)
	var out bytes.Buffer
	cmd.Stdout = &out
	err = cmd.Run()
	return out.String(), err
}

func TestPluginAddPassesThePreviousResultThrough(t *testing.T) {
	g := NewWithT(t)
	netns := podNetns(t)
	var got []cni.Request
	sock := filepath.Join(t.TempDir(), "cni.sock")
	srv, err := cni.Listen(sock, cni.HandlerFunc(func(_ context.Context, req cni.Request, f *os.File) cni.Response {
		if f == nil {
			return cni.Response{Result: cni.ResultError, Message: "no netns"}
		}
		got = append(got, req)
		return cni.Response{Result: cni.ResultEnrolled}
	}), logr.Discard())
	g.Expect(err).NotTo(HaveOccurred())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ctx) }()
	defer func() { cancel(); <-done }()

	out, err := runPlugin(t, "ADD", netns, sock)
	g.Expect(err).NotTo(HaveOccurred(), out)
	var want, have map[string]any
	g.Expect(json.Unmarshal([]byte(prevResult), &want)).To(Succeed())
	g.Expect(json.Unmarshal([]byte(out), &have)).To(Succeed(), out)
	delete(want, "dns")
	delete(have, "dns")
	g.Expect(have).To(Equal(want), "the previous result, unchanged")
	g.Expect(got).To(HaveLen(1))
	g.Expect([]string{got[0].Namespace, got[0].Name, got[0].UID, got[0].ContainerID}).To(Equal([]string{"shop", "web-0", "6c5d4e3f-2a1b-4c9d-8e7f-0a1b2c3d4e5f", "sandbox-1"}))
}

func TestPluginFailsClosedAndNeverFailsATeardown(t *testing.T) {
	g := NewWithT(t)
	netns := podNetns(t)
	absent := filepath.Join(t.TempDir(), "cni.sock")
	out, err := runPlugin(t, "ADD", netns, absent)
	g.Expect(err).To(HaveOccurred(), "ADD without an agent fails")
	var e struct {
		Code uint   `json:"code"`
		Msg  string `json:"msg"`
	}
	g.Expect(json.Unmarshal([]byte(out), &e)).To(Succeed(), out)
	g.Expect(e.Msg).To(ContainSubstring("pod shop/web-0 not started: the meshkeeper node agent is not serving on this node"))

	out, err = runPlugin(t, "DEL", netns, absent)
	g.Expect(err).NotTo(HaveOccurred(), out)
	out, err = runPlugin(t, "DEL", "", absent)
	g.Expect(err).NotTo(HaveOccurred(), "DEL after the namespace is gone: %s", out)
}

package cni

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	. "github.com/onsi/gomega"
)

// The real node's conflist (test/cluster), with a foreign plugin after
// loopback and a top-level field libcni ignores.
const nodeConflist = `{
  "cniVersion": "1.0.0",
  "name": "meshkeeper-test",
  "plugins": [
    {"type": "bridge", "bridge": "mkbr0", "isGateway": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.213.0.0/24"}]]}},
    {"type": "loopback"},
    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
  ],
  "disableCheck": false
}
`

var testConf = PluginConf{Socket: "/run/mk/cni.sock", Timeout: "5s", ExcludeNamespaces: []string{"kube-system", "istio-system"}}

func plugins(g Gomega, data []byte) []map[string]any {
	var c struct {
		Plugins []map[string]any `json:"plugins"`
	}
	g.Expect(json.Unmarshal(data, &c)).To(Succeed(), string(data))
	return c.Plugins
}

func types(ps []map[string]any) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p["type"].(string))
	}
	return out
}

func TestChainAppendsLastAndKeepsEverythingElse(t *testing.T) {
	g := NewWithT(t)
	out, changed, err := Chain([]byte(nodeConflist), testConf)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(changed).To(BeTrue())
	ps := plugins(g, out)
	g.Expect(types(ps)).To(Equal([]string{"bridge", "loopback", "portmap", PluginType}))
	g.Expect(ps[3]).To(Equal(map[string]any{"type": PluginType, "socket": "/run/mk/cni.sock", "timeout": "5s", "excludeNamespaces": []any{"kube-system", "istio-system"}}))

	// Foreign entries and top-level fields: same content, same order.
	var before, after map[string]any
	g.Expect(json.Unmarshal([]byte(nodeConflist), &before)).To(Succeed())
	g.Expect(json.Unmarshal(out, &after)).To(Succeed())
	g.Expect(after["plugins"].([]any)[:3]).To(Equal(before["plugins"].([]any)))
	delete(before, "plugins")
	delete(after, "plugins")
	g.Expect(after).To(Equal(before))
	s := string(out)
	g.Expect(strings.Index(s, `"cniVersion"`)).To(BeNumerically("<", strings.Index(s, `"name"`)))
	g.Expect(strings.Index(s, `"plugins"`)).To(BeNumerically("<", strings.Index(s, `"disableCheck"`)))
}

func TestChainIsIdempotent(t *testing.T) {
	g := NewWithT(t)
	once, _, err := Chain([]byte(nodeConflist), testConf)
	g.Expect(err).NotTo(HaveOccurred())
	twice, changed, err := Chain(once, testConf)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(changed).To(BeFalse())
	g.Expect(twice).To(Equal(once), "unchanged bytes: nothing to write")
}

func TestChainReplacesAnOldOrMisplacedEntry(t *testing.T) {
	g := NewWithT(t)
	old := strings.Replace(nodeConflist, `{"type": "loopback"},`, `{"type": "loopback"}, {"type": "meshkeeper-cni", "socket": "/old.sock"},`, 1)
	out, changed, err := Chain([]byte(old), testConf)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(changed).To(BeTrue())
	ps := plugins(g, out)
	g.Expect(types(ps)).To(Equal([]string{"bridge", "loopback", "portmap", PluginType}))
	g.Expect(ps[3]["socket"]).To(Equal("/run/mk/cni.sock"))

	// Right place, other settings (a new socket path): rewritten too.
	other := testConf
	other.Timeout = "9s"
	out2, changed, err := Chain(out, other)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(changed).To(BeTrue())
	g.Expect(plugins(g, out2)[3]["timeout"]).To(Equal("9s"))
}

func TestUnchainRemovesOnlyOurEntry(t *testing.T) {
	g := NewWithT(t)
	chained, _, err := Chain([]byte(nodeConflist), testConf)
	g.Expect(err).NotTo(HaveOccurred())
	out, changed, err := Unchain(chained)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(changed).To(BeTrue())
	var want, got map[string]any
	g.Expect(json.Unmarshal([]byte(nodeConflist), &want)).To(Succeed())
	g.Expect(json.Unmarshal(out, &got)).To(Succeed())
	g.Expect(got).To(Equal(want))

	again, changed, err := Unchain(out)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(changed).To(BeFalse())
	g.Expect(again).To(Equal(out))
}

func TestChainRejectsWhatIsNotAConflist(t *testing.T) {
	for name, data := range map[string]string{
		"truncated":        nodeConflist[:60],
		"not an object":    `["bridge"]`,
		"single .conf":     `{"cniVersion": "1.0.0", "name": "n", "type": "bridge"}`,
		"plugins not list": `{"cniVersion": "1.0.0", "name": "n", "plugins": {"type": "bridge"}}`,
		"empty plugins":    `{"cniVersion": "1.0.0", "name": "n", "plugins": []}`,
		"plugin w/o type":  `{"cniVersion": "1.0.0", "name": "n", "plugins": [{"bridge": "x"}]}`,
		"trailing data":    nodeConflist + `{}`,
		"duplicate key":    `{"name": "a", "name": "b", "plugins": [{"type": "bridge"}]}`,
	} {
		t.Run(name, func(t *testing.T) {
			g := NewWithT(t)
			_, _, err := Chain([]byte(data), testConf)
			g.Expect(err).To(HaveOccurred())
			_, _, err = Unchain([]byte(data))
			g.Expect(err).To(HaveOccurred())
		})
	}
}

func writeNode(t *testing.T, conflist string) (confDir, binDir, plugin string) {
	t.Helper()
	dir := t.TempDir()
	confDir, binDir = filepath.Join(dir, "net.d"), filepath.Join(dir, "bin")
	if err := os.MkdirAll(confDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(confDir, "10-net.conflist"), []byte(conflist), 0o640); err != nil {
		t.Fatal(err)
	}
	// A later file the runtime does not read: left alone.
	if err := os.WriteFile(filepath.Join(confDir, "99-other.conflist"), []byte(nodeConflist), 0o644); err != nil {
		t.Fatal(err)
	}
	plugin = filepath.Join(dir, "plugin")
	if err := os.WriteFile(plugin, []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return confDir, binDir, plugin
}

func TestInstallAndUninstallOnDisk(t *testing.T) {
	g := NewWithT(t)
	confDir, binDir, plugin := writeNode(t, nodeConflist)
	o := InstallOptions{ConfDir: confDir, BinDir: binDir, PluginBinary: plugin, Conf: testConf}
	r, err := Install(o)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(r).To(Equal(InstallResult{ConfFile: filepath.Join(confDir, "10-net.conflist"), ConfChanged: true, BinaryChanged: true}))
	data, err := os.ReadFile(r.ConfFile)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(types(plugins(g, data))).To(Equal([]string{"bridge", "loopback", "portmap", PluginType}))
	st, err := os.Stat(r.ConfFile)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(st.Mode().Perm()).To(Equal(os.FileMode(0o640)), "the file's mode is kept")
	bin, err := os.Stat(filepath.Join(binDir, PluginType))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(bin.Mode().Perm() & 0o111).NotTo(BeZero())
	other, err := os.ReadFile(filepath.Join(confDir, "99-other.conflist"))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(string(other)).To(Equal(nodeConflist))

	r, err = Install(o)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(r.ConfChanged || r.BinaryChanged).To(BeFalse(), "second install changes nothing")
	entries, _ := os.ReadDir(confDir)
	g.Expect(entries).To(HaveLen(2), "no temporary file left")

	changed, err := Uninstall(confDir, binDir)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(changed).To(ConsistOf(r.ConfFile, filepath.Join(binDir, PluginType)))
	data, err = os.ReadFile(r.ConfFile)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(types(plugins(g, data))).To(Equal([]string{"bridge", "loopback", "portmap"}))
	_, err = os.Stat(filepath.Join(binDir, PluginType))
	g.Expect(os.IsNotExist(err)).To(BeTrue())

	changed, err = Uninstall(confDir, binDir)
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(changed).To(BeEmpty(), "idempotent")
	_, err = Uninstall(filepath.Join(confDir, "absent"), filepath.Join(binDir, "absent"))
	g.Expect(err).NotTo(HaveOccurred(), "absent directories are clean already")
}

func TestInstallLeavesAMalformedFileAlone(t *testing.T) {
	g := NewWithT(t)
	broken := nodeConflist[:80]
	confDir, binDir, plugin := writeNode(t, broken)
	_, err := Install(InstallOptions{ConfDir: confDir, BinDir: binDir, PluginBinary: plugin, Conf: testConf})
	g.Expect(err).To(MatchError(ContainSubstring("10-net.conflist")))
	g.Expect(err).To(MatchError(ContainSubstring("did not change it")))
	data, err := os.ReadFile(filepath.Join(confDir, "10-net.conflist"))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(string(data)).To(Equal(broken), "no write")
	entries, _ := os.ReadDir(confDir)
	g.Expect(entries).To(HaveLen(2), "no temporary file left")
}

func TestInstallWithoutConfigSaysSo(t *testing.T) {
	g := NewWithT(t)
	dir := t.TempDir()
	plugin := filepath.Join(dir, "plugin")
	g.Expect(os.WriteFile(plugin, []byte("x"), 0o755)).To(Succeed())
	_, err := Install(InstallOptions{ConfDir: dir + "/net.d-empty", BinDir: dir + "/bin", PluginBinary: plugin, Conf: testConf})
	g.Expect(err).To(HaveOccurred())
	g.Expect(os.MkdirAll(dir+"/net.d", 0o755)).To(Succeed())
	_, err = Install(InstallOptions{ConfDir: dir + "/net.d", BinDir: dir + "/bin", PluginBinary: plugin, Conf: testConf})
	g.Expect(err).To(MatchError(ContainSubstring("no CNI config in")))
}

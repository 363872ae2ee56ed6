package cni

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// InstallOptions say where the node's CNI lives and what to chain.
type InstallOptions struct {
	// ConfDir is the node's CNI config directory (as the agent sees it).
	ConfDir string
	// BinDir is the node's CNI bin directory (as the agent sees it).
	BinDir string
	// PluginBinary is the plugin to copy into BinDir (in the agent's image).
	PluginBinary string
	// Conf is the plugin's entry.
	Conf PluginConf
}

// InstallResult says what Install did.
type InstallResult struct {
	// ConfFile is the conflist the plugin is chained into.
	ConfFile      string
	ConfChanged   bool
	BinaryChanged bool
}

// Install copies the plugin binary into the bin directory and chains the
// plugin into the node's active conflist: the first config file by name, as
// the container runtime picks it. Both are written only when they differ
// from what is there, and atomically (a temporary file renamed in place),
// so the runtime never reads half a file. Idempotent. A config file that is
// not a conflist is an error and is left untouched.
func Install(o InstallOptions) (InstallResult, error) {
	var r InstallResult
	changed, err := copyBinary(o.PluginBinary, filepath.Join(o.BinDir, PluginType))
	if err != nil {
		return r, err
	}
	r.BinaryChanged = changed
	file, err := ActiveConfFile(o.ConfDir)
	if err != nil {
		return r, err
	}
	r.ConfFile = file
	data, err := os.ReadFile(file)
	if err != nil {
		return r, err
	}
	out, changed, err := Chain(data, o.Conf)
	if err != nil {
		return r, fmt.Errorf("%s: %w; meshkeeper did not change it: fix the file (or the network plugin that writes it)", file, err)
	}
	if changed {
		if err := writeAtomic(file, out); err != nil {
			return r, err
		}
	}
	r.ConfChanged = changed
	return r, nil
}

// Uninstall removes the plugin's entry from every config file in confDir
// that has one, and the plugin binary from binDir. It returns what it
// changed; absent directories and files are no error (idempotent). Files it
// cannot parse are left alone and reported.
func Uninstall(confDir, binDir string) (changed []string, err error) {
	var errs []error
	files, err := confFiles(confDir)
	if err != nil && !os.IsNotExist(err) {
		errs = append(errs, err)
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !bytes.Contains(data, []byte(PluginType)) {
			continue
		}
		out, ch, err := Unchain(data)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w; left as it is", f, err))
			continue
		}
		if ch {
			if err := writeAtomic(f, out); err != nil {
				errs = append(errs, err)
				continue
			}
			changed = append(changed, f)
		}
	}
	if binDir != "" {
		bin := filepath.Join(binDir, PluginType)
		if err := os.Remove(bin); err == nil {
			changed = append(changed, bin)
		} else if !os.IsNotExist(err) {
			errs = append(errs, err)
		}
	}
	return changed, errors.Join(errs...)
}

// confFiles are the CNI config files of dir in the order libcni (and so
// the container runtime) reads them.
func confFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		switch filepath.Ext(e.Name()) {
		case ".conf", ".conflist", ".json":
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	sort.Strings(out)
	return out, nil
}

// ActiveConfFile is the config file the runtime uses: the first by name.
func ActiveConfFile(dir string) (string, error) {
	files, err := confFiles(dir)
	if err != nil {
		return "", fmt.Errorf("CNI config directory: %w", err)
	}
	if len(files) == 0 {
		return "", fmt.Errorf("no CNI config in %s yet (the network plugin writes it; meshkeeper chains itself in once it exists)", dir)
	}
	return files[0], nil
}

// writeAtomic replaces path with data through a temporary file in the
// same directory (not named like a config file), keeping path's mode.
func writeAtomic(path string, data []byte) error {
	mode := os.FileMode(0o644)
	if st, err := os.Stat(path); err == nil {
		mode = st.Mode().Perm()
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+PluginType+"-*.tmp")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func copyBinary(src, dst string) (bool, error) {
	want, err := os.ReadFile(src)
	if err != nil {
		return false, fmt.Errorf("CNI plugin binary: %w", err)
	}
	if have, err := os.ReadFile(dst); err == nil && bytes.Equal(have, want) {
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return false, err
	}
	tmp := filepath.Join(filepath.Dir(dst), "."+PluginType+".tmp")
	if err := os.WriteFile(tmp, want, 0o755); err != nil {
		return false, fmt.Errorf("copy the CNI plugin to %s: %w", dst, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		_ = os.Remove(tmp)
		return false, fmt.Errorf("copy the CNI plugin to %s: %w", dst, err)
	}
	return true, nil
}

// Excluded says whether ns is among excluded.
func Excluded(ns string, excluded []string) bool {
	for _, e := range excluded {
		if strings.TrimSpace(e) == ns {
			return true
		}
	}
	return false
}

package csi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	yaml "go.yaml.in/yaml/v3"
)

// TestManifests parses every manifest under deploy/kubernetes and checks
// kinds, names and the references between them against the driver itself.
//
// What it proves: every document is YAML of a known kind and apiVersion
// with a name; namespaced objects are in the namespace the manifests
// create; the CSIDriver, StorageClasses and VolumeSnapshotClass name the
// driver's GetPluginInfo name; StorageClass parameters are accepted by the
// driver's own parser (ParseParams) and cover the three presets; every
// workload's ServiceAccount exists, its selector matches its template,
// its volume mounts name declared volumes; every RBAC binding names an
// existing role and ServiceAccount; the sidecars reach the driver's socket
// through a shared volume; the registrar's kubelet path is the plugin
// directory of this driver; --master names an existing Service and port;
// the node plugin is privileged with Bidirectional propagation on the
// kubelet directory; the StatefulSets' services exist; the controller
// carries the provisioner, resizer and snapshotter sidecars and its
// account holds their rules (snapshot contents and classes too); the
// VolumeSnapshotClass has no parameters (the driver refuses any); the
// master and servers start (a non-loopback listen address has TLS flags
// or --insecure, as the daemons demand); the servers serve the admin API
// that snapshots and clones use, advertised and on their Service.
//
// What it cannot prove (no cluster runs here): that an API server accepts
// the objects (schema, defaults, admission), that the images exist and
// pull (blockd:latest must be built from deploy/kubernetes/Dockerfile,
// which no test builds), that the sidecar versions suit the cluster, that
// the RBAC rules are enough for the sidecars at run time, that the
// snapshot CRDs and snapshot-controller are installed, that mount
// propagation and the nbd module work on the nodes, and that volumes
// actually provision: the driver's behaviour is proven by the sanity
// suite and the guest tests instead.
func TestManifests(t *testing.T) {
	root := filepath.Join("..", "deploy", "kubernetes")
	var files []string
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			files = append(files, p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no manifests under deploy/kubernetes")
	}
	var objs []obj
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		for i := 0; ; i++ {
			var m map[string]any
			err := dec.Decode(&m)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: document %d: %v", f, i, err)
			}
			if m == nil {
				continue
			}
			o := obj{m: m, file: filepath.Base(f)}
			if o.kind() == "" || o.name() == "" || str(m, "apiVersion") == "" {
				t.Errorf("%s: document %d lacks apiVersion, kind or metadata.name", f, i)
				continue
			}
			objs = append(objs, o)
		}
	}
	c := &checker{t: t, objs: objs}
	c.kinds()
	c.driverNames()
	c.workloads()
	c.rbac()
	c.services()
	kinds := map[string]int{}
	for _, o := range objs {
		kinds[o.kind()]++
	}
	t.Logf("%d manifest files, %d objects: %v", len(files), len(objs), kinds)
}

type obj struct {
	m    map[string]any
	file string
}

func (o obj) kind() string      { return str(o.m, "kind") }
func (o obj) name() string      { return str(o.m, "metadata", "name") }
func (o obj) namespace() string { return str(o.m, "metadata", "namespace") }
func (o obj) String() string {
	return fmt.Sprintf("%s %s/%s (%s)", o.kind(), o.namespace(), o.name(), o.file)
}

func get(v any, path ...string) any {
	for _, p := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[p]
	}
	return v
}

func str(v any, path ...string) string {
	s, _ := get(v, path...).(string)
	return s
}

func list(v any, path ...string) []any {
	l, _ := get(v, path...).([]any)
	return l
}

func strs(v any, path ...string) []string {
	var out []string
	for _, x := range list(v, path...) {
		if s, ok := x.(string); ok {
			out = append(out, s)
		}
	}
	return out
}

type checker struct {
	t    *testing.T
	objs []obj
}

func (c *checker) find(kind, ns, name string) *obj {
	for i := range c.objs {
		o := &c.objs[i]
		if o.kind() == kind && o.name() == name && o.namespace() == ns {
			return o
		}
	}
	return nil
}

func (c *checker) all(kind string) []obj {
	var out []obj
	for _, o := range c.objs {
		if o.kind() == kind {
			out = append(out, o)
		}
	}
	return out
}

var clusterScoped = map[string]bool{"Namespace": true, "CSIDriver": true, "StorageClass": true,
	"ClusterRole": true, "ClusterRoleBinding": true, "VolumeSnapshotClass": true}

var apiVersions = map[string]string{
	"Namespace": "v1", "ServiceAccount": "v1", "Service": "v1",
	"CSIDriver": "storage.k8s.io/v1", "StorageClass": "storage.k8s.io/v1",
	"ClusterRole": "rbac.authorization.k8s.io/v1", "ClusterRoleBinding": "rbac.authorization.k8s.io/v1",
	"Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
	"Deployment": "apps/v1", "DaemonSet": "apps/v1", "StatefulSet": "apps/v1",
	"VolumeSnapshotClass": "snapshot.storage.k8s.io/v1",
}

func (c *checker) kinds() {
	seen := map[string]bool{}
	for _, o := range c.objs {
		want, ok := apiVersions[o.kind()]
		if !ok {
			c.t.Errorf("%v: unexpected kind", o)
			continue
		}
		if got := str(o.m, "apiVersion"); got != want {
			c.t.Errorf("%v: apiVersion %s, want %s", o, got, want)
		}
		key := o.kind() + "/" + o.namespace() + "/" + o.name()
		if seen[key] {
			c.t.Errorf("%v: defined twice", o)
		}
		seen[key] = true
		switch {
		case clusterScoped[o.kind()] && o.namespace() != "":
			c.t.Errorf("%v: cluster-scoped kind with a namespace", o)
		case !clusterScoped[o.kind()] && o.namespace() == "":
			c.t.Errorf("%v: namespaced kind without a namespace", o)
		case !clusterScoped[o.kind()] && c.find("Namespace", "", o.namespace()) == nil:
			c.t.Errorf("%v: namespace %s is not created by the manifests", o, o.namespace())
		}
	}
	for _, k := range []string{"CSIDriver", "StorageClass", "VolumeSnapshotClass", "Deployment", "DaemonSet", "StatefulSet",
		"ServiceAccount", "ClusterRole", "ClusterRoleBinding"} {
		if len(c.all(k)) == 0 {
			c.t.Errorf("no %s in the manifests", k)
		}
	}
}

func (c *checker) driverNames() {
	d, err := New(Config{Endpoint: "unix:///unused", Mode: ModeController})
	if err != nil {
		c.t.Fatal(err)
	}
	info, err := d.GetPluginInfo(context.Background(), &csi.GetPluginInfoRequest{})
	if err != nil {
		c.t.Fatal(err)
	}
	name := info.GetName()
	drivers := c.all("CSIDriver")
	if len(drivers) != 1 || drivers[0].name() != name {
		c.t.Errorf("CSIDriver objects %v: want exactly one named %q (GetPluginInfo)", drivers, name)
	}
	for _, o := range drivers {
		if get(o.m, "spec", "attachRequired") != false {
			c.t.Errorf("%v: attachRequired must be false: the driver has no ControllerPublishVolume", o)
		}
	}
	presets := map[string]bool{}
	for _, o := range c.all("StorageClass") {
		if p := str(o.m, "provisioner"); p != name {
			c.t.Errorf("%v: provisioner %q, want %q", o, p, name)
		}
		params := map[string]string{}
		if pm, ok := get(o.m, "parameters").(map[string]any); ok {
			for k, v := range pm {
				s, ok := v.(string)
				if !ok {
					c.t.Errorf("%v: parameter %s is %T, StorageClass parameters are strings", o, k, v)
				}
				params[k] = s
			}
		}
		p, err := ParseParams(params)
		if err != nil {
			c.t.Errorf("%v: the driver refuses its parameters: %v", o, err)
		}
		presets[p.Preset] = true
		if fs := params["csi.storage.k8s.io/fstype"]; !fsTypes[fs] {
			c.t.Errorf("%v: fstype %q is not one the driver makes", o, fs)
		}
		if get(o.m, "allowVolumeExpansion") != true {
			c.t.Errorf("%v: allowVolumeExpansion should be true (the driver expands online)", o)
		}
	}
	for _, want := range []string{"database", "general", "throughput"} {
		if !presets[want] {
			c.t.Errorf("no StorageClass for preset %s", want)
		}
	}
	for _, o := range c.all("VolumeSnapshotClass") {
		if d := str(o.m, "driver"); d != name {
			c.t.Errorf("%v: driver %q, want %q", o, d, name)
		}
		if pm, _ := get(o.m, "parameters").(map[string]any); len(pm) > 0 {
			c.t.Errorf("%v: parameters %v: CreateSnapshot refuses every parameter", o, pm)
		}
	}
}

// socketOf returns the directory a container's --csi-address or
// --endpoint socket lives in, and the volume mounted there.
func socketOf(ct any) (sock string) {
	for _, a := range append(strs(ct, "args"), strs(ct, "command")...) {
		if v, ok := strings.CutPrefix(a, "--csi-address="); ok {
			return v
		}
		if v, ok := strings.CutPrefix(a, "--endpoint="); ok {
			return strings.TrimPrefix(v, "unix://")
		}
	}
	return ""
}

func mountFor(ct any, path string) (vol string, m any) {
	best := ""
	for _, vm := range list(ct, "volumeMounts") {
		mp := str(vm, "mountPath")
		if (path == mp || strings.HasPrefix(path, strings.TrimSuffix(mp, "/")+"/")) && len(mp) > len(best) {
			best, vol, m = mp, str(vm, "name"), vm
		}
	}
	return vol, m
}

func (c *checker) workloads() {
	var sawController, sawNode bool
	for _, kind := range []string{"Deployment", "DaemonSet", "StatefulSet"} {
		for _, o := range c.all(kind) {
			spec := get(o.m, "spec", "template", "spec")
			sa := str(spec, "serviceAccountName")
			if sa == "" || c.find("ServiceAccount", o.namespace(), sa) == nil {
				c.t.Errorf("%v: serviceAccountName %q is not a ServiceAccount of the manifests", o, sa)
			}
			sel, _ := get(o.m, "spec", "selector", "matchLabels").(map[string]any)
			labels, _ := get(o.m, "spec", "template", "metadata", "labels").(map[string]any)
			if len(sel) == 0 {
				c.t.Errorf("%v: no selector", o)
			}
			for k, v := range sel {
				if labels[k] != v {
					c.t.Errorf("%v: selector %s=%v does not match the template labels %v", o, k, v, labels)
				}
			}
			vols := map[string]any{}
			for _, v := range list(spec, "volumes") {
				vols[str(v, "name")] = v
			}
			for _, vct := range list(o.m, "spec", "volumeClaimTemplates") {
				vols[str(vct, "metadata", "name")] = vct
			}
			cts := append(list(spec, "containers"), list(spec, "initContainers")...)
			sockets := map[string]string{} // container -> volume holding its socket
			var driverCt any
			for _, ct := range cts {
				for _, vm := range list(ct, "volumeMounts") {
					if _, ok := vols[str(vm, "name")]; !ok {
						c.t.Errorf("%v: container %s mounts undeclared volume %q", o, str(ct, "name"), str(vm, "name"))
					}
				}
				if s := socketOf(ct); s != "" {
					v, _ := mountFor(ct, s)
					if v == "" {
						c.t.Errorf("%v: container %s: socket %s is not on a volume", o, str(ct, "name"), s)
					}
					sockets[str(ct, "name")] = v + ":" + s
				}
				args := strs(ct, "args")
				if len(args) > 0 && args[0] == "csi" {
					driverCt = ct
				}
				for _, a := range args {
					if v, ok := strings.CutPrefix(a, "--master="); ok {
						c.checkServiceAddr(o, v)
					}
				}
			}
			if len(sockets) > 1 {
				var vals []string
				for _, v := range sockets {
					vals = append(vals, v)
				}
				sort.Strings(vals)
				if vals[0] != vals[len(vals)-1] {
					c.t.Errorf("%v: the sidecars and the driver use different sockets: %v", o, sockets)
				}
			}
			if driverCt == nil {
				continue
			}
			mode := ""
			for _, a := range strs(driverCt, "args") {
				mode, _ = strings.CutPrefix(a, "--mode=")
				if mode != a {
					break
				}
			}
			images := map[string]bool{}
			for _, ct := range cts {
				img := str(ct, "image")
				images[img[:max(0, strings.LastIndex(img, ":"))]] = true
			}
			switch mode {
			case ModeController:
				sawController = true
				for _, s := range []string{"registry.k8s.io/sig-storage/csi-provisioner", "registry.k8s.io/sig-storage/csi-resizer",
					"registry.k8s.io/sig-storage/csi-snapshotter"} {
					if !images[s] {
						c.t.Errorf("%v: controller lacks sidecar %s", o, s)
					}
				}
			case ModeNode:
				sawNode = true
				c.checkNode(o, spec, driverCt, cts)
			default:
				c.t.Errorf("%v: driver container has --mode=%q", o, mode)
			}
		}
	}
	if !sawController || !sawNode {
		c.t.Errorf("want a controller-mode and a node-mode driver workload (controller %v, node %v)", sawController, sawNode)
	}
	c.daemons()
	for _, o := range c.all("StatefulSet") {
		svc := str(o.m, "spec", "serviceName")
		if c.find("Service", o.namespace(), svc) == nil {
			c.t.Errorf("%v: serviceName %q is not a Service of the manifests", o, svc)
		}
	}
}

func (c *checker) checkNode(o obj, spec, driverCt any, cts []any) {
	if get(driverCt, "securityContext", "privileged") != true {
		c.t.Errorf("%v: the node plugin must be privileged (netlink, mount, mkfs)", o)
	}
	var reg any
	for _, ct := range cts {
		if strings.Contains(str(ct, "image"), "csi-node-driver-registrar") {
			reg = ct
		}
	}
	if reg == nil {
		c.t.Errorf("%v: no node-driver-registrar", o)
		return
	}
	hostPath := func(vol string) string {
		for _, v := range list(spec, "volumes") {
			if str(v, "name") == vol {
				return str(v, "hostPath", "path")
			}
		}
		return ""
	}
	pluginDir := "/var/lib/kubelet/plugins/" + DriverName
	var regPath string
	for _, a := range strs(reg, "args") {
		if v, ok := strings.CutPrefix(a, "--kubelet-registration-path="); ok {
			regPath = v
		}
	}
	if regPath != pluginDir+"/csi.sock" {
		c.t.Errorf("%v: kubelet registration path %q, want %s/csi.sock", o, regPath, pluginDir)
	}
	sock := socketOf(driverCt)
	vol, _ := mountFor(driverCt, sock)
	if hp := hostPath(vol); hp != pluginDir {
		c.t.Errorf("%v: the driver's socket volume %q is host path %q, want %s", o, vol, hp, pluginDir)
	}
	regVol, _ := mountFor(reg, "/registration/x")
	if hp := hostPath(regVol); hp != "/var/lib/kubelet/plugins_registry" {
		c.t.Errorf("%v: registrar's /registration is host path %q", o, hp)
	}
	kv, km := mountFor(driverCt, "/var/lib/kubelet/pods")
	if hostPath(kv) != "/var/lib/kubelet" || str(km, "mountPropagation") != "Bidirectional" {
		c.t.Errorf("%v: the driver needs /var/lib/kubelet from the host with Bidirectional propagation (got volume %q, %v)", o, kv, km)
	}
	if dv, _ := mountFor(driverCt, "/dev/nbd0"); hostPath(dv) != "/dev" {
		c.t.Errorf("%v: the driver needs the host's /dev (nbd devices)", o)
	}
}

// checkServiceAddr checks NAME.NAMESPACE.svc:PORT against the Services.
func (c *checker) checkServiceAddr(o obj, addr string) {
	for _, a := range strings.Split(addr, ",") {
		host, port, ok := strings.Cut(a, ":")
		parts := strings.Split(host, ".")
		if !ok || len(parts) < 3 || parts[2] != "svc" {
			c.t.Errorf("%v: --master %q is not NAME.NAMESPACE.svc:PORT", o, a)
			continue
		}
		svc := c.find("Service", parts[1], parts[0])
		if svc == nil {
			c.t.Errorf("%v: --master names Service %s/%s, which the manifests do not define", o, parts[1], parts[0])
			continue
		}
		found := false
		for _, p := range list(svc.m, "spec", "ports") {
			if fmt.Sprint(get(p, "port")) == port {
				found = true
			}
		}
		if !found {
			c.t.Errorf("%v: --master port %s is not a port of %v", o, port, *svc)
		}
	}
}

func (c *checker) rbac() {
	for _, kind := range []string{"ClusterRoleBinding", "RoleBinding"} {
		for _, o := range c.all(kind) {
			rk, rn := str(o.m, "roleRef", "kind"), str(o.m, "roleRef", "name")
			ns := ""
			if rk == "Role" {
				ns = o.namespace()
			}
			if c.find(rk, ns, rn) == nil {
				c.t.Errorf("%v: roleRef %s %s does not exist", o, rk, rn)
			}
			subs := list(o.m, "subjects")
			if len(subs) == 0 {
				c.t.Errorf("%v: no subjects", o)
			}
			for _, s := range subs {
				if str(s, "kind") != "ServiceAccount" {
					continue
				}
				if c.find("ServiceAccount", str(s, "namespace"), str(s, "name")) == nil {
					c.t.Errorf("%v: subject ServiceAccount %s/%s does not exist", o, str(s, "namespace"), str(s, "name"))
				}
			}
		}
	}
	// The controller's account is bound to the provisioner's and the
	// resizer's rules (persistentvolumes create for one, patch for the other).
	for _, w := range c.all("Deployment") {
		sa := str(w.m, "spec", "template", "spec", "serviceAccountName")
		verbs := map[string]bool{}
		for _, b := range c.all("ClusterRoleBinding") {
			bound := false
			for _, s := range list(b.m, "subjects") {
				bound = bound || (str(s, "name") == sa && str(s, "namespace") == w.namespace())
			}
			if r := c.find("ClusterRole", "", str(b.m, "roleRef", "name")); bound && r != nil {
				for _, rule := range list(r.m, "rules") {
					for _, res := range strs(rule, "resources") {
						for _, v := range strs(rule, "verbs") {
							verbs[res+":"+v] = true
						}
					}
				}
			}
		}
		for _, need := range []string{"persistentvolumes:create", "persistentvolumes:delete", "persistentvolumes:patch",
			"persistentvolumeclaims:get", "persistentvolumeclaims/status:patch", "storageclasses:get", "events:create",
			// the snapshotter, and the provisioner restoring a snapshot
			"volumesnapshotclasses:list", "volumesnapshotcontents:watch", "volumesnapshotcontents:update",
			"volumesnapshotcontents/status:update", "volumesnapshots:get"} {
			if !verbs[need] {
				c.t.Errorf("%v: ServiceAccount %s lacks %s", w, sa, need)
			}
		}
	}
}

func (c *checker) services() {
	for _, s := range c.all("Service") {
		sel, _ := get(s.m, "spec", "selector").(map[string]any)
		matched := false
		for _, kind := range []string{"Deployment", "DaemonSet", "StatefulSet"} {
			for _, w := range c.all(kind) {
				if w.namespace() != s.namespace() {
					continue
				}
				labels, _ := get(w.m, "spec", "template", "metadata", "labels").(map[string]any)
				ok := len(sel) > 0
				for k, v := range sel {
					ok = ok && labels[k] == v
				}
				matched = matched || ok
			}
		}
		if !matched {
			c.t.Errorf("%v: its selector %v matches no workload", s, sel)
		}
	}
}

// flagValue returns the value of --name in args (--name=V or --name V)
// and whether it is there.
func flagValue(args []string, name string) (string, bool) {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
		if a == "--"+name {
			if i+1 < len(args) && !strings.HasPrefix(args[i+1], "--") {
				return args[i+1], true
			}
			return "", true
		}
	}
	return "", false
}

// daemons checks the blockd master and server containers the way the
// daemons check themselves at start: a non-loopback listen address needs
// TLS credentials or --insecure (else the process refuses to start); the
// servers serve the admin API (--http, advertised) that snapshots and
// clones need, on a port of their Service.
func (c *checker) daemons() {
	listens := map[string][]string{"master": {"api", "raft"}, "server": {"listen", "nbd", "http"}, "serve": {"api", "listen", "nbd"}}
	var servers int
	for _, kind := range []string{"Deployment", "DaemonSet", "StatefulSet"} {
		for _, o := range c.all(kind) {
			for _, ct := range list(o.m, "spec", "template", "spec", "containers") {
				args := strs(ct, "args")
				if len(args) == 0 || listens[args[0]] == nil {
					continue
				}
				_, tls := flagValue(args, "tls-cert")
				_, insecure := flagValue(args, "insecure")
				for _, f := range listens[args[0]] {
					v, ok := flagValue(args, f)
					host, _, _ := strings.Cut(v, ":")
					if ok && host != "127.0.0.1" && host != "localhost" && !tls && !insecure {
						c.t.Errorf("%v: %s --%s %s binds a non-loopback address without --tls-* or --insecure: it would refuse to start", o, args[0], f, v)
					}
				}
				if args[0] != "server" {
					continue
				}
				servers++
				h, ok := flagValue(args, "http")
				if !ok || h == "" {
					c.t.Errorf("%v: the servers need --http (the admin API: CSI snapshots and clones)", o)
					continue
				}
				if _, ok := flagValue(args, "advertise-http"); !ok && strings.HasPrefix(h, "0.0.0.0:") {
					c.t.Errorf("%v: --http %s needs --advertise-http (clients cannot dial 0.0.0.0)", o, h)
				}
				_, port, _ := strings.Cut(h, ":")
				svc := c.find("Service", o.namespace(), str(o.m, "spec", "serviceName"))
				found := false
				if svc != nil {
					for _, p := range list(svc.m, "spec", "ports") {
						found = found || fmt.Sprint(get(p, "port")) == port
					}
				}
				if !found {
					c.t.Errorf("%v: the admin API port %s is not a port of its Service", o, port)
				}
			}
		}
	}
	if servers == 0 {
		c.t.Error("no blockd server workload")
	}
}

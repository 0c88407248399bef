package repair

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"tcpha/internal/privtest"
)

func TestProgLoadAttrLayout(t *testing.T) {
	var a progLoadAttr
	if s := unsafe.Sizeof(a); s != sizeofProgLoadAttr {
		t.Errorf("sizeof = %d, want %d", s, sizeofProgLoadAttr)
	}
	for name, got := range map[string]uintptr{
		"insn_cnt": unsafe.Offsetof(a.InsnCnt), "insns": unsafe.Offsetof(a.Insns),
		"license": unsafe.Offsetof(a.License), "log_buf": unsafe.Offsetof(a.LogBuf),
		"kern_version": unsafe.Offsetof(a.KernVersion), "prog_flags": unsafe.Offsetof(a.ProgFlags),
	} {
		want := map[string]uintptr{"insn_cnt": 4, "insns": 8, "license": 16, "log_buf": 32, "kern_version": 40, "prog_flags": 44}[name]
		if got != want {
			t.Errorf("offset of %s = %d, want %d", name, got, want)
		}
	}
}

// As root the eBPF program loads and attaches; the blocking behaviour
// itself is TestBlockThenResume's.
func TestDropProgramLoads(t *testing.T) {
	privtest.Require(t)
	if _, err := dropProgram(); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	pfd, _ := dropProgram()
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ATTACH_BPF, pfd); err != nil {
		t.Fatalf("SO_ATTACH_BPF: %v", err)
	}
	if err := detachDrop(fd); err != nil {
		t.Fatal(err)
	}
}

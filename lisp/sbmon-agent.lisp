;;;; sbmon-agent.lisp -- the Lisp side of sbmon.
;;;;
;;;; This file owns the agent that runs inside a monitored SBCL image: the listener
;;;; (Unix socket or loopback TCP + token), the framed s-expression protocol of
;;;; docs/protocol.md (its own reader and printer: nothing is evaluated or interned),
;;;; the operations (:ping :memory :gc :runtime :threads :backtrace :backtraces
;;;; :subscribe; :heap-histogram :heap-retainers, in sbmon-agent-heap.lisp, and the
;;;; control/eval operations :gc-run :gc-tune :kill-thread :profile :eval :reload-system,
;;;; in sbmon-agent-control.lisp and served only when START's :allow names their class: both
;;;; files are loaded on first use), GC pause
;;;; measurement (an encapsulation of SB-KERNEL::SUB-GC and SB-EXT:GC that records into
;;;; preallocated arrays without consing) and the :gc event stream.
;;;;
;;;; Load with (load "lisp/sbmon-agent.lisp") and start with (sbmon-agent:start).
;;;; No contrib is loaded with it (its sockets are the C library's, called directly);
;;;; sb-sprof and ASDF are required lazily, on the first :profile or :reload-system call.
;;;; The agent never prints to the host's *standard-output*, never lets a condition reach
;;;; the debugger, and keeps bounded memory.  Loading this file prints nothing.
;;;;
;;;; Sections, in this order:
;;;;   Limits and constants
;;;;   SBCL internals and the C library   (the only code that touches either)
;;;;   Agent errors
;;;;   Bounded printing of arbitrary objects
;;;;   Payload reader
;;;;   Payload printer
;;;;   GC pause recording
;;;;   Agent state                        (connections, threads the agent started)
;;;;   Framing
;;;;   Events                             (the event thread and each subscriber's sender)
;;;;   Argument helpers
;;;;   Operations: memory, gc, runtime
;;;;   Threads
;;;;   Backtraces
;;;;   Subscribe
;;;;   Control and evaluation operations  (what STOP needs of them; the rest is a part)
;;;;   Parts loaded on first use          (sbmon-agent-heap.lisp, sbmon-agent-control.lisp)
;;;;   Dispatch                           (the operation table, classes, :allow)
;;;;   Listening sockets
;;;;   Connections                        (handshake, connection threads, the listener)
;;;;   Start / stop                       (and the exit hook)

(defpackage #:sbmon-agent
  (:use #:common-lisp)
  (:export #:start #:stop #:address #:*version*))

(in-package #:sbmon-agent)

(declaim (optimize (speed 1) (safety 1) (debug 1)))

(defparameter *version* "0.1.0"
  "Version of the sbmon agent (a string).")

;; Functions used before their definition (quiet source LOAD, form by form).
(declaim (ftype function send-octets close-connection conn-shutdown secret-path
                ensure-secret-file exit-cleanup %start %stop))

;;;; ------------------------------------------------------------------------
;;;; Limits and constants

(defconstant +protocol+ 1)
(defconstant +max-in-frame+ 1048576)
(defconstant +max-out-frame+ 16777215)
(defconstant +max-connections+ 16)
(defconstant +max-slow-calls+ 4)
(defconstant +max-depth+ 100)
(defconstant +max-token+ 200)
(defconstant +hello-timeout+ 10)
(defconstant +send-timeout-seconds+ 10)
(defconstant +ring-size+ 64)
(defconstant +generations+ 7)
(defconstant +buckets+ 17)
(defconstant +message-limit+ 2000)
(defconstant +frame-chars+ 400)

(defparameter *bucket-bounds*
  '(1d-4 2.5d-4 5d-4 1d-3 2.5d-3 5d-3 1d-2 2.5d-2 5d-2 0.1d0 0.25d0 0.5d0 1d0 2.5d0 5d0 10d0)
  "Upper bounds (seconds) of the pause histogram buckets; a 17th bucket holds the rest.")

;;;; ------------------------------------------------------------------------
;;;; SBCL internals and the C library
;;;;
;;;; The only section that touches either.  Every SBCL internal the agent uses (SB-KERNEL,
;;;; SB-INT, SB-IMPL, SB-UNIX, SB-SYS, SB-DEBUG, SB-THREAD beyond its documented interface,
;;;; the C runtime's n_gcs) is reached through the small functions below, and so is every C
;;;; library call (EXTERN-ALIEN).  Each internal is looked up once, when this file is loaded
;;;; or compiled: present, the function calls it directly; absent (a newer SBCL renamed or
;;;; removed it), the function does what its fallback says, the internal is listed in the
;;;; welcome's :missing-internals, and the capability flag that needs it is left out of
;;;; :capabilities.  The file still loads and every operation still answers.  Contribs loaded
;;;; lazily (sb-sprof, ASDF) are looked up by name when first used, through CONTRIB-FUNCTION.
;;;; (The payload reader's FIND-SYMBOL in KEYWORD is standard Common Lisp, not an internal.)

(eval-when (:compile-toplevel :load-toplevel :execute)
  (defun find-internal (package name)
    "The symbol PACKAGE::NAME, or NIL when this SBCL has no such package or symbol."
    (let ((p (find-package package)))
      (and p (find-symbol name p))))

  (defun internal-present-p (symbol as)
    "True when SYMBOL can be used AS :call (a function), :value or :variable (a bound
variable), :function (the name of a function), :macro, or :symbol (any symbol: a special
variable that is unbound until some thread binds it)."
    (and symbol
         (ecase as
           (:symbol t)
           ((:call :function) (and (fboundp symbol) (not (macro-function symbol))
                                   (not (special-operator-p symbol))))
           ((:value :variable) (boundp symbol))
           (:macro (and (macro-function symbol) t))))))

(defvar *internals* '()
  "One entry (\"PACKAGE::NAME\" capability present-p) per SBCL internal used.")

(defun note-internal (name capability present)
  (setf *internals*
        (append (remove name *internals* :key #'first :test #'string=)
                (list (list name capability present)))))

(defun missing-internals ()
  "Names of the SBCL internals this image lacks (the welcome's :missing-internals)."
  (loop for (name nil present) in *internals* unless present collect name))

(defun capability-internals-present-p (capability)
  "True when every internal that CAPABILITY needs is present."
  (loop for (nil needed-by present) in *internals*
        never (and (eq needed-by capability) (not present))))

(defmacro define-internal (name lambda-list (package symbol &key capability (as :call))
                           &body fallback)
  "Define function NAME over PACKAGE::SYMBOL, looked up now.  AS :call calls it with the
parameters of LAMBDA-LIST (required ones, or (&rest ARGS)); :value returns the variable's
value; :function, :variable and :symbol return the symbol itself.  When the symbol is absent NAME
evaluates FALLBACK instead.  CAPABILITY names the capability flag that needs it."
  (let* ((sym (find-internal package symbol))
         (present (internal-present-p sym as))
         (args (remove '&rest lambda-list))
         (body (cond ((not present) `(progn ,@(or fallback '(nil))))
                     ((member as '(:function :variable :symbol)) `',sym)
                     ((eq as :value) `(if (boundp ',sym) (symbol-value ',sym) (progn ,@fallback)))
                     ((member '&rest lambda-list) `(apply ',sym ,@args))
                     (t `(,sym ,@args)))))
    `(progn
       (note-internal ,(format nil "~a::~a" package symbol) ,capability ,present)
       (defun ,name ,lambda-list
         (declare (ignorable ,@args))
         ,body))))

(defmacro define-internal-constant (name (package symbol) fallback)
  "DEFCONSTANT NAME as the value of PACKAGE::SYMBOL, or FALLBACK when it is absent."
  (let ((sym (find-internal package symbol)))
    `(progn
       (note-internal ,(format nil "~a::~a" package symbol) nil ,(internal-present-p sym :value))
       (defconstant ,name ,(if (internal-present-p sym :value) (symbol-value sym) fallback)))))

;;; Memory and GC

(define-internal heap-used () ("SB-KERNEL" "DYNAMIC-USAGE")
  ;; the generations' bytes: what dynamic-usage adds up, give or take the open regions
  (loop for g from 0 below +generations+ sum (sb-ext:generation-bytes-allocated g)))

(define-internal sub-gc-name () ("SB-KERNEL" "SUB-GC" :capability :pause-timing :as :function))

(define-internal encapsulate (name type function)
    ("SB-INT" "ENCAPSULATE" :capability :pause-timing)
  (error "this SBCL has no SB-INT:ENCAPSULATE"))

(define-internal unencapsulate (name type) ("SB-INT" "UNENCAPSULATE" :capability :pause-timing))

(define-internal gc-epoch () ("SB-KERNEL" "*GC-EPOCH*" :as :value))

;; n_gcs, the runtime's count of collections, read straight from the C variable; -1 without it
(defmacro define-n-gcs-reader ()
  (let* ((finder (find-internal "SB-SYS" "FIND-FOREIGN-SYMBOL-ADDRESS"))
         (present (and (internal-present-p finder :call)
                       (ignore-errors (funcall finder "n_gcs"))
                       t)))
    `(progn
       (note-internal "C runtime n_gcs" :gc-count ,present)
       (declaim (inline n-gcs))
       (defun n-gcs ()
         ,(if present
              '(the fixnum (sb-alien:extern-alien "n_gcs" sb-alien:int))
              -1)))))
(define-n-gcs-reader)

(defmacro without-interrupts* (&body body)
  "BODY with interrupts deferred (SB-SYS:WITHOUT-INTERRUPTS); plain BODY without it."
  (let ((m (find-internal "SB-SYS" "WITHOUT-INTERRUPTS")))
    (if (internal-present-p m :macro) `(,m ,@body) `(progn ,@body))))
(defmacro note-internal-macro (package symbol)
  "Record whether the macro PACKAGE::SYMBOL was present when this file was loaded."
  `(note-internal ,(format nil "~a::~a" package symbol) nil
                  ,(internal-present-p (find-internal package symbol) :macro)))
(note-internal-macro "SB-SYS" "WITHOUT-INTERRUPTS")

;;; Threads

(define-internal os-thread-id (thread) ("SB-THREAD" "THREAD-OS-TID" :capability :thread-tids))

(define-internal main-lisp-thread () ("SB-THREAD" "MAIN-THREAD" :capability :thread-kinds)
  (find "main thread" (sb-thread:list-all-threads) :key #'sb-thread:thread-name :test #'equal))

(define-internal system-thread-p (thread)
    ("SB-THREAD" "THREAD-EPHEMERAL-P" :capability :thread-kinds))

(define-internal thread-blocker (thread)
    ("SB-THREAD" "THREAD-WAITING-FOR" :capability :thread-waits))

(define-internal waitqueue-label (queue) ("SB-THREAD" "WAITQUEUE-NAME" :capability :thread-waits))

;; A thread inside the debugger has SB-DEBUG:*DEBUG-CONDITION* bound (SBCL binds it in
;; %INVOKE-DEBUGGER, before a thread that is not at the foreground waits for it); reading
;; another thread's binding needs SYMBOL-VALUE-IN-THREAD.
(define-internal debug-condition-variable ()
    ("SB-DEBUG" "*DEBUG-CONDITION*" :capability :thread-debugger :as :symbol))

(define-internal value-in-thread (symbol thread errorp)
    ("SB-THREAD" "SYMBOL-VALUE-IN-THREAD" :capability :thread-debugger)
  (values nil nil))

;; The (thread . mutex) pairs of the cycle SBCL found when it signalled THREAD-DEADLOCK.
(define-internal deadlock-cycle (condition)
    ("SB-THREAD" "THREAD-DEADLOCK-CYCLE" :capability :thread-debugger))

;;; The debugger, the printer, exit

(define-internal list-frames (&rest args)
    ("SB-DEBUG" "LIST-BACKTRACE" :capability :backtrace-frames))

(define-internal print-vector-length-variable ()
    ("SB-EXT" "*PRINT-VECTOR-LENGTH*" :as :variable))

(define-internal exit-in-progress () ("SB-IMPL" "*EXIT-IN-PROGRESS*" :as :value))

(defun exit-in-progress-p ()
  "True once SB-EXT:EXIT has begun to unwind the image."
  (and (exit-in-progress) t))

;;; Files and errors

;; The connection's input stream over its socket descriptor; closing the stream closes it.
(defmacro define-fd-input-stream ()
  (let* ((sym (find-internal "SB-SYS" "MAKE-FD-STREAM"))
         (present (internal-present-p sym :call)))
    `(progn
       (note-internal "SB-SYS::MAKE-FD-STREAM" nil ,present)
       (defun fd-input-stream (fd name)
         ,(if present
              `(,sym fd :input t :element-type '(unsigned-byte 8) :buffering :full
                        :name name :auto-close nil)
              '(error "this SBCL has no SB-SYS:MAKE-FD-STREAM"))))))
(define-fd-input-stream)

(define-internal lstat (path) ("SB-UNIX" "UNIX-LSTAT")
  ;; without it a path can only be told present (and then treated as foreign) or absent
  (if (probe-file path) (values t 0 0 0 0 -1) nil))

(define-internal-constant +eintr+ ("SB-UNIX" "EINTR") 4)
(define-internal-constant +ewouldblock+ ("SB-UNIX" "EWOULDBLOCK") 11)

;;; Contribs loaded on first use

(defun contrib-function (package name)
  "The function PACKAGE::NAME of a contrib loaded lazily (sb-sprof, ASDF), or NIL."
  (let ((s (find-internal package name)))
    (and (internal-present-p s :call) s)))

(defun contrib-variable (package name)
  "The variable PACKAGE::NAME of a contrib loaded lazily, or NIL."
  (let ((s (find-internal package name)))
    (and (internal-present-p s :variable) s)))

;;; The C library

(defun os-getpid ()
  (sb-alien:alien-funcall (sb-alien:extern-alien "getpid" (function sb-alien:int))))

(defun os-getuid ()
  (sb-alien:alien-funcall (sb-alien:extern-alien "getuid" (function sb-alien:unsigned-int))))

(defun os-unlink (path)
  (sb-alien:alien-funcall
   (sb-alien:extern-alien "unlink" (function sb-alien:int sb-alien:c-string)) path))

(defun os-mkdir (path mode)
  "mkdir(2): T, or NIL and the errno."
  (let ((r (sb-alien:alien-funcall
            (sb-alien:extern-alien "mkdir" (function sb-alien:int sb-alien:c-string
                                                     sb-alien:unsigned-int))
            path mode)))
    (if (zerop r) t (values nil (sb-alien:get-errno)))))

(defun os-error-text (errno)
  (sb-alien:alien-funcall
   (sb-alien:extern-alien "strerror" (function sb-alien:c-string sb-alien:int)) errno))

(defun chmod (path mode)
  (sb-alien:alien-funcall
   (sb-alien:extern-alien "chmod" (function sb-alien:int sb-alien:c-string sb-alien:unsigned-int))
   path mode))

;; Sockets, without sb-bsd-sockets: a contrib's classes and conditions would make every
;; nursery collection of the host slower (README, "The agent's cost to its host").  Linux
;; values; each call returns the descriptor or signals an error naming the call and errno.

(defconstant +af-unix+ 1)
(defconstant +af-inet+ 2)
(defconstant +sock-stream+ 1)
(defconstant +sock-nonblock+ #o4000)
(defconstant +sock-cloexec+ #o2000000)

(defun os-close (fd)
  (sb-alien:alien-funcall (sb-alien:extern-alien "close" (function sb-alien:int sb-alien:int))
                          fd))

(defun socket-error (call &optional fd)
  "Signal an error for the failed CALL (its errno), closing FD first when given."
  (let ((errno (sb-alien:get-errno)))
    (when fd (os-close fd))
    (error "~a failed: ~a" call (os-error-text errno))))

(defun os-socket (domain &key nonblocking)
  (let ((fd (sb-alien:alien-funcall
             (sb-alien:extern-alien "socket" (function sb-alien:int sb-alien:int sb-alien:int
                                                       sb-alien:int))
             domain
             (logior +sock-stream+ +sock-cloexec+ (if nonblocking +sock-nonblock+ 0))
             0)))
    (if (< fd 0) (socket-error "socket") fd)))

(defun unix-address (path)
  "struct sockaddr_un for PATH, as octets."
  (let ((bytes (sb-ext:string-to-octets path :external-format :utf-8))
        (addr (make-array 110 :element-type '(unsigned-byte 8) :initial-element 0)))
    (unless (< (length bytes) 108)
      (error "socket path ~a is too long (~d bytes; the limit is 107)" path (length bytes)))
    (setf (aref addr 0) +af-unix+)
    (replace addr bytes :start1 2)
    addr))

(defun loopback-address (port)
  "struct sockaddr_in for 127.0.0.1:PORT, as octets."
  (let ((addr (make-array 16 :element-type '(unsigned-byte 8) :initial-element 0)))
    (setf (aref addr 0) +af-inet+
          (aref addr 2) (ldb (byte 8 8) port) (aref addr 3) (ldb (byte 8 0) port)
          (aref addr 4) 127 (aref addr 7) 1)
    addr))

(defmacro define-address-call (name c-name)
  `(defun ,name (fd addr)
     ,(format nil "~a(2) of FD to ADDR (octets): T, or NIL and the errno." c-name)
     (declare (type (simple-array (unsigned-byte 8) (*)) addr))
     (let ((r (sb-sys:with-pinned-objects (addr)
                (sb-alien:alien-funcall
                 (sb-alien:extern-alien ,c-name (function sb-alien:int sb-alien:int
                                                          sb-sys:system-area-pointer
                                                          sb-alien:unsigned-int))
                 fd (sb-sys:vector-sap addr) (length addr)))))
       (if (zerop r) t (values nil (sb-alien:get-errno))))))

(define-address-call os-bind* "bind")
(define-address-call os-connect "connect")

(defun os-bind (fd addr)
  (or (os-bind* fd addr) (socket-error "bind" fd)))

(defun os-listen (fd)
  (unless (zerop (sb-alien:alien-funcall
                  (sb-alien:extern-alien "listen" (function sb-alien:int sb-alien:int
                                                            sb-alien:int))
                  fd 16))
    (socket-error "listen" fd)))

(defun os-accept (fd)
  "A new connection's descriptor (blocking, close-on-exec), or NIL when none is waiting."
  (let ((c (sb-alien:alien-funcall
            (sb-alien:extern-alien "accept4" (function sb-alien:int sb-alien:int
                                                       sb-sys:system-area-pointer
                                                       sb-sys:system-area-pointer sb-alien:int))
            fd (sb-sys:int-sap 0) (sb-sys:int-sap 0) +sock-cloexec+)))
    (and (>= c 0) c)))

(defun reuse-address (fd)
  (sb-alien:with-alien ((one sb-alien:int 1))
    (unless (zerop (sb-alien:alien-funcall
                    (sb-alien:extern-alien "setsockopt"
                                           (function sb-alien:int sb-alien:int sb-alien:int
                                                     sb-alien:int (* sb-alien:int)
                                                     sb-alien:unsigned-int))
                    fd 1 2 (sb-alien:addr one) 4)) ; SOL_SOCKET, SO_REUSEADDR
      (socket-error "setsockopt" fd))))

(defun bound-port (fd)
  "The local port of FD (a TCP socket), from getsockname(2)."
  (let ((addr (make-array 16 :element-type '(unsigned-byte 8) :initial-element 0)))
    (sb-alien:with-alien ((len sb-alien:unsigned-int 16))
      (unless (zerop (sb-sys:with-pinned-objects (addr)
                       (sb-alien:alien-funcall
                        (sb-alien:extern-alien "getsockname"
                                               (function sb-alien:int sb-alien:int
                                                         sb-sys:system-area-pointer
                                                         (* sb-alien:unsigned-int)))
                        fd (sb-sys:vector-sap addr) (sb-alien:addr len))))
        (socket-error "getsockname" fd)))
    (+ (* 256 (aref addr 2)) (aref addr 3))))

(defun fd-shutdown (fd)
  (ignore-errors
   (sb-alien:alien-funcall
    (sb-alien:extern-alien "shutdown" (function sb-alien:int sb-alien:int sb-alien:int))
    fd 2)))

(declaim (inline mono-ns))
(defun mono-ns ()
  "CLOCK_MONOTONIC in nanoseconds (a fixnum).  Conses nothing: the GC recorder uses it."
  (sb-alien:with-alien ((ts (array sb-alien:long 2)))
    (sb-alien:alien-funcall
     (sb-alien:extern-alien "clock_gettime" (function sb-alien:int sb-alien:int
                                                      (* (array sb-alien:long 2))))
     1 (sb-alien:addr ts))            ; CLOCK_MONOTONIC = 1
    (the fixnum (+ (* (the (unsigned-byte 32) (sb-alien:deref ts 0)) 1000000000)
                   (the (unsigned-byte 30) (sb-alien:deref ts 1))))))

(defun wait-fd (fd events milliseconds)
  "Wait up to MILLISECONDS for EVENTS (POLLIN 1, POLLOUT 4) on FD, or its closing, with
poll(2).  Returns NIL on timeout or when a signal (a GC stopping the world, for one)
interrupted the wait: the caller recomputes its time left from its own deadline."
  (sb-alien:with-alien ((pfd (array (sb-alien:signed 32) 2)))
    ;; struct pollfd { int fd; short events; short revents; }: events in the low half
    ;; (little-endian) of the second word, revents 0.
    (setf (sb-alien:deref pfd 0) fd
          (sb-alien:deref pfd 1) events)
    (plusp (sb-alien:alien-funcall
            (sb-alien:extern-alien "poll" (function sb-alien:int sb-sys:system-area-pointer
                                                    sb-alien:unsigned-long sb-alien:int))
            (sb-alien:alien-sap pfd) 1 (max 0 (min milliseconds 1000000))))))

(defun send-all (fd octets n &key (timeout +send-timeout-seconds+))
  "Write the first N of OCTETS to FD within TIMEOUT seconds; return T, or NIL when the peer
is gone or took too long.  The deadline is absolute (CLOCK_MONOTONIC): the sends never block
and the waits for room are recomputed after each interruption, so a GC every millisecond
cannot stretch it (as it does SO_SNDTIMEO, which restarts after every signal).  TIMEOUT 0
never waits: NIL when the socket buffer has no room."
  (declare (type (simple-array (unsigned-byte 8) (*)) octets) (type fixnum n))
  (let ((off 0)
        (deadline (+ (mono-ns) (round (* timeout 1d9))))
        (send (sb-alien:extern-alien "send" (function sb-alien:long sb-alien:int
                                                      sb-sys:system-area-pointer
                                                      sb-alien:unsigned-long sb-alien:int))))
    (loop while (< off n)
          do (let ((r (sb-sys:with-pinned-objects (octets)
                        ;; MSG_NOSIGNAL | MSG_DONTWAIT
                        (sb-alien:alien-funcall send fd
                                                (sb-sys:sap+ (sb-sys:vector-sap octets) off)
                                                (- n off) #x4040))))
               (cond ((> r 0) (incf off r))
                     ((and (< r 0) (member (sb-alien:get-errno)
                                           (list +eintr+ +ewouldblock+)))
                      (let ((left (- deadline (mono-ns))))
                        (when (<= left 0) (return-from send-all nil))
                        (wait-fd fd 4 (ceiling left 1000000))))
                     (t (return-from send-all nil)))))
    t))

(defun recv-available (fd octets start)
  "Read into OCTETS from START what FD has now, without waiting: the count read, 0 at end
of file or on an error, NIL when nothing has arrived yet."
  (declare (type (simple-array (unsigned-byte 8) (*)) octets) (type fixnum start))
  (let ((r (sb-sys:with-pinned-objects (octets)
             ;; MSG_DONTWAIT = #x40
             (sb-alien:alien-funcall
              (sb-alien:extern-alien "recv" (function sb-alien:long sb-alien:int
                                                      sb-sys:system-area-pointer
                                                      sb-alien:unsigned-long sb-alien:int))
              fd (sb-sys:sap+ (sb-sys:vector-sap octets) start) (- (length octets) start) #x40))))
    (cond ((> r 0) r)
          ((= r 0) 0)
          ((member (sb-alien:get-errno) (list +eintr+ +ewouldblock+)) nil)
          (t 0))))

(defun file-kind (path)
  "Return :directory, :socket, :other or NIL (absent), and the owner uid."
  (multiple-value-bind (ok dev ino mode nlink uid) (lstat path)
    (declare (ignore dev ino nlink))
    (if (not ok)
        nil
        (values (case (logand mode #o170000)
                  (#o040000 :directory)
                  (#o140000 :socket)
                  (t :other))
                uid))))

(defun getenv-nonempty (name)
  (let ((v (sb-ext:posix-getenv name)))
    (and v (plusp (length v)) v)))

;;;; ------------------------------------------------------------------------
;;;; Agent errors (turned into error replies with a chosen :type)
;;;;
;;;; The agent signals its own errors as SIMPLE-ERRORs marked by their format control (the
;;;; string in *AGENT-ERROR-CONTROL*, compared with EQ), not as condition classes of its own:
;;;; every class an image defines makes each of its nursery collections slower (README, "The
;;;; agent's cost to its host").  The format arguments are (TEXT KIND CLASS EXTRA): the report
;;;; prints TEXT; KIND is the reply's :type; CLASS is :agent-error (an operation's failure),
;;;; :malformed (a payload the reader refuses), :frame-error (a bad frame) or :too-large (a
;;;; reply beyond the frame limit); EXTRA is a plist appended to the error reply.

(defvar *agent-error-control* (copy-seq "~a")
  "The format control that marks a SIMPLE-ERROR as one of the agent's own.")

(defun agent-error (class kind text &optional extra)
  "Signal the agent's error CLASS with reply type KIND and message TEXT."
  (error 'simple-error :format-control *agent-error-control*
                       :format-arguments (list text kind class extra)))

(defun agent-condition-p (c &optional class)
  "True when C is one of the agent's errors (of CLASS, if given)."
  (and (typep c 'simple-error)
       (eq (simple-condition-format-control c) *agent-error-control*)
       (let ((args (simple-condition-format-arguments c)))
         (and (listp args) (= (length args) 4)
              (or (null class) (eq (third args) class))))))

(defun agent-error-kind (c) (second (simple-condition-format-arguments c)))
(defun agent-error-text (c) (first (simple-condition-format-arguments c)))
(defun agent-error-extra (c) (fourth (simple-condition-format-arguments c)))

(defun fail (kind fmt &rest args)
  (agent-error :agent-error kind
               (let ((*print-length* 20) (*print-level* 4) (*print-pretty* nil))
                 (apply #'format nil fmt args))))

(defun malformed (fmt &rest args)
  (agent-error :malformed "MALFORMED" (apply #'format nil fmt args)))

(defun frame-error (text)
  (agent-error :frame-error "FRAME-ERROR" text))

;;;; ------------------------------------------------------------------------
;;;; Bounded printing of arbitrary objects

(defmacro with-safe-printing (() &body body)
  `(let ((*print-length* 5) (*print-level* 3) (*print-readably* nil)
         (*print-pretty* nil) (*print-circle* nil) (*print-escape* t)
         (*print-lines* nil) (*print-base* 10) (*print-radix* nil)
         (*package* (find-package "CL-USER")))
     (progv (let ((s (print-vector-length-variable)))
              (and s (list s)))
         '(100)
       ,@body)))

(defun one-line (string limit)
  "STRING with newlines turned into spaces, cut to LIMIT characters."
  (let* ((s (substitute #\Space #\Return (substitute #\Space #\Newline string))))
    (if (> (length s) limit)
        (concatenate 'string (subseq s 0 (max 0 (- limit 3))) "...")
        s)))

(defun safe-string (fn limit)
  "Call FN with a string output stream under bounded printer settings; never signals."
  (handler-case
      (let ((text (with-safe-printing ()
                    (with-output-to-string (s) (funcall fn s)))))
        (if (> (length text) limit)
            (concatenate 'string (subseq text 0 (max 0 (- limit 3))) "...")
            text))
    (serious-condition () "#<error while printing>")))

(defun condition-message (c)
  (safe-string (lambda (s) (princ c s)) +message-limit+))

(defun condition-type-name (c)
  (if (agent-condition-p c)
      (agent-error-kind c)
      (handler-case (symbol-name (type-of c))
        (serious-condition () "ERROR"))))

;;;; ------------------------------------------------------------------------
;;;; Payload reader (hand-written; evaluates nothing, interns nothing)

;; Records are vectors (DEFSTRUCT :TYPE VECTOR), not structure classes: every class an image
;; defines makes each of its nursery collections slower (README, "The agent's cost to its
;; host"), and the agent defines none of its own.
(defstruct (unknown-keyword (:type vector) :named (:constructor make-unknown-keyword (name)))
  (name "" :type string))

(defun whitespace-char-p (c)
  (member c '(#\Space #\Tab #\Newline #\Return #\Linefeed #\Page)))

(defun terminator-p (c)
  (or (whitespace-char-p c) (member c '(#\( #\) #\"))))

(defun digits-p (s start end)
  (and (< start end)
       (loop for i from start below end always (digit-char-p (char s i)))))

(defun integer-token-p (tok)
  (let ((start (if (and (> (length tok) 0) (find (char tok 0) "+-")) 1 0)))
    (digits-p tok start (length tok))))

(defun float-token-p (tok)
  "[+-]? (d+ [. d*] | . d+) [exp [+-]? d{1,4}], with a dot or an exponent."
  (let* ((n (length tok))
         (i (if (and (> n 0) (find (char tok 0) "+-")) 1 0))
         (int-start i))
    (loop while (and (< i n) (digit-char-p (char tok i))) do (incf i))
    (let ((int-digits (- i int-start)) (frac-digits 0) (dot nil) (expo nil))
      (when (and (< i n) (char= (char tok i) #\.))
        (setf dot t)
        (incf i)
        (let ((fs i))
          (loop while (and (< i n) (digit-char-p (char tok i))) do (incf i))
          (setf frac-digits (- i fs))))
      (when (and (< i n) (find (char tok i) "esfdlESFDL"))
        (incf i)
        (when (and (< i n) (find (char tok i) "+-")) (incf i))
        (let ((es i))
          (loop while (and (< i n) (digit-char-p (char tok i))) do (incf i))
          (unless (<= 1 (- i es) 4) (return-from float-token-p nil))
          (setf expo t)))
      (and (= i n)
           (or dot expo)
           (or (> int-digits 0) (> frac-digits 0))
           (or (> int-digits 0) dot)))))

(defun parse-float-token (tok)
  (handler-case
      (let ((x (with-standard-io-syntax
                 (let ((*read-eval* nil)
                       (*read-default-float-format* 'double-float))
                   (read-from-string tok)))))
        (unless (realp x) (malformed "bad number ~a" tok))
        (coerce x 'double-float))
    (error (c)
      (if (agent-condition-p c :malformed)
          (error c)
          (malformed "bad float ~a" (one-line tok 40))))))

(defun token-to-datum (tok)
  (when (> (length tok) +max-token+)
    (malformed "token too long (~d characters)" (length tok)))
  (when (find-if (lambda (c) (find c "|\\#'`,;")) tok)
    (malformed "unsupported syntax in token ~s" (one-line tok 40)))
  (cond ((char= (char tok 0) #\:)
         (let ((name (subseq tok 1)))
           (when (or (zerop (length name)) (find #\: name))
             (malformed "bad keyword ~s" (one-line tok 40)))
           (multiple-value-bind (sym status)
               (find-symbol (string-upcase name) "KEYWORD")
             (if status sym (make-unknown-keyword (string-downcase name))))))
        ((find #\: tok) (malformed "only keywords may be symbols: ~s" (one-line tok 40)))
        ((string-equal tok "t") t)
        ((string-equal tok "nil") nil)
        ((integer-token-p tok) (parse-integer tok))
        ((float-token-p tok) (parse-float-token tok))
        ((string= tok ".") (malformed "dotted pairs are not allowed"))
        ((or (digit-char-p (char tok 0)) (find (char tok 0) "+-."))
         (malformed "bad number ~s" (one-line tok 40)))
        (t (malformed "unexpected symbol or token ~s" (one-line tok 40)))))

(defun parse-payload (text)
  "Parse TEXT (one datum, surrounding whitespace allowed) or signal MALFORMED."
  (declare (type string text))
  (let ((pos 0) (n (length text)))
    (labels ((peek () (and (< pos n) (char text pos)))
             (skip-ws () (loop while (and (< pos n) (whitespace-char-p (char text pos)))
                               do (incf pos)))
             (read-string* ()
               (incf pos)
               (let ((out (make-string-output-stream)))
                 (loop
                   (when (>= pos n) (malformed "unterminated string"))
                   (let ((c (char text pos)))
                     (incf pos)
                     (cond ((char= c #\") (return (get-output-stream-string out)))
                           ((char= c #\\)
                            (when (>= pos n) (malformed "unterminated string"))
                            (let ((e (char text pos)))
                              (unless (member e '(#\" #\\))
                                (malformed "bad escape \\~a in string" e))
                              (write-char e out)
                              (incf pos)))
                           (t (write-char c out)))))))
             (read-token ()
               (let ((start pos))
                 (loop while (and (< pos n) (not (terminator-p (char text pos))))
                       do (incf pos)
                          (when (> (- pos start) +max-token+)
                            (malformed "token too long")))
                 (token-to-datum (subseq text start pos))))
             (read-datum (depth)
               (skip-ws)
               (let ((c (peek)))
                 (cond ((null c) (malformed "unexpected end of message"))
                       ((char= c #\()
                        (when (>= depth +max-depth+) (malformed "nesting deeper than ~d" +max-depth+))
                        (incf pos)
                        (let ((items '()))
                          (loop
                            (skip-ws)
                            (let ((d (peek)))
                              (cond ((null d) (malformed "unterminated list"))
                                    ((char= d #\)) (incf pos) (return (nreverse items)))
                                    (t (push (read-datum (1+ depth)) items)))))))
                       ((char= c #\)) (malformed "unexpected )"))
                       ((char= c #\") (read-string* ))
                       (t (read-token))))))
      (let ((datum (read-datum 0)))
        (skip-ws)
        (when (< pos n) (malformed "trailing characters after the message"))
        datum))))

;;;; ------------------------------------------------------------------------
;;;; Payload printer

(defun finite-double-p (x)
  (and (typep x 'double-float)
       (not (sb-ext:float-nan-p x))
       (not (sb-ext:float-infinity-p x))))

;; Replies are encoded straight into the octets of their frame: the 6-byte header is left free
;; at the front and filled in last.  Printing through a string stream and then converting to
;; UTF-8 cost about 13 us for a :memory reply; this costs a few.  Growth stops at the frame
;; limit, so an oversized reply fails early instead of being built whole.

(defconstant +header-bytes+ 6)

(defun too-large (bytes)
  (agent-error :too-large "TOO-LARGE"
               (format nil "reply of more than ~d bytes exceeds the frame limit of ~d bytes"
                       bytes +max-out-frame+)))

(deftype outbuf () 'simple-vector)
(defstruct (outbuf (:type vector) (:constructor make-outbuf ()))
  (octets (make-array 2048 :element-type '(unsigned-byte 8))
   :type (simple-array (unsigned-byte 8) (*)))
  (fill +header-bytes+ :type fixnum))

;; Make room for N more octets; returns the (possibly new) octet vector.
(declaim (ftype (function (outbuf fixnum) (values (simple-array (unsigned-byte 8) (*)) &optional))
                reserve))
(defun reserve (buf n)
  (declare (type outbuf buf) (type fixnum n))
  (let ((octets (outbuf-octets buf)) (need (+ (outbuf-fill buf) n)))
    (when (> need (length octets))
      (when (> need (+ +max-out-frame+ +header-bytes+ 1))
        (too-large +max-out-frame+))
      (let ((bigger (make-array (min (max need (* 2 (length octets)))
                                     (+ +max-out-frame+ +header-bytes+ 1))
                                :element-type '(unsigned-byte 8))))
        (replace bigger octets)
        (setf octets bigger (outbuf-octets buf) bigger)))
    octets))

(declaim (inline put-byte))
(defun put-byte (buf byte)
  (declare (type outbuf buf) (type (unsigned-byte 8) byte) (optimize speed))
  (let ((octets (if (< (outbuf-fill buf) (length (outbuf-octets buf)))
                    (outbuf-octets buf)
                    (reserve buf 1)))
        (fill (outbuf-fill buf)))
    (setf (aref octets fill) byte
          (outbuf-fill buf) (1+ fill))))

(defun put-multibyte-char (buf code)
  (declare (type outbuf buf) (type (integer #x80 #x10FFFF) code) (optimize speed))
  (cond ((< code #x800)
         (put-byte buf (logior #xC0 (ash code -6)))
         (put-byte buf (logior #x80 (logand code #x3F))))
        ((<= #xD800 code #xDFFF) (put-byte buf 63))
        ((< code #x10000)
         (put-byte buf (logior #xE0 (ash code -12)))
         (put-byte buf (logior #x80 (logand (ash code -6) #x3F)))
         (put-byte buf (logior #x80 (logand code #x3F))))
        (t
         (put-byte buf (logior #xF0 (ash code -18)))
         (put-byte buf (logior #x80 (logand (ash code -12) #x3F)))
         (put-byte buf (logior #x80 (logand (ash code -6) #x3F)))
         (put-byte buf (logior #x80 (logand code #x3F))))))

(declaim (inline put-char))
(defun put-char (buf c)
  "C as UTF-8; lone surrogates (not encodable) become #\?."
  (declare (type outbuf buf) (type character c) (optimize speed))
  (let ((code (char-code c)))
    (if (< code #x80)
        (put-byte buf code)
        (put-multibyte-char buf code))))

(defmacro with-simple-string ((var string) &body body)
  "BODY with VAR bound to STRING, compiled once per simple string type so CHAR is fast."
  `(let ((,var ,string))
     (typecase ,var
       ((simple-array character (*)) ,@body)
       (simple-base-string ,@body)
       (t (let ((,var (coerce ,var 'simple-string))) ,@body)))))

(defun put-chars (buf string &key downcase escape)
  "STRING as UTF-8.  DOWNCASE for keyword names; ESCAPE puts a backslash before \" and \\.
Runs of plain ASCII are copied in one pass: this is most of what a reply is made of."
  (declare (type outbuf buf) (type string string) (optimize speed))
  (with-simple-string (s string)
    (let ((n (length s)) (i 0))
      (declare (type fixnum n i))
      (loop while (< i n)
            do (let* ((octets (reserve buf (- n i)))
                      (fill (outbuf-fill buf)))
                 (declare (type fixnum fill))
                 (loop while (< i n)
                       do (let ((code (char-code (char s i))))
                            (when (or (>= code #x80) (and escape (or (= code 34) (= code 92))))
                              (return))
                            (when (and downcase (<= 65 code 90))
                              (incf code 32))
                            (setf (aref octets fill) code)
                            (incf fill)
                            (incf i)))
                 (setf (outbuf-fill buf) fill))
               (when (< i n)
                 (let ((c (char s i)))
                   (when (and escape (or (char= c #\") (char= c #\\))) (put-byte buf 92))
                   (put-char buf (if downcase (char-downcase c) c))
                   (incf i)))))))

(defun put-string-literal (buf string)
  (put-byte buf 34)
  (put-chars buf string :escape t)
  (put-byte buf 34))

(defun put-integer (buf n)
  (declare (type outbuf buf) (type integer n) (optimize speed))
  (if (typep n 'fixnum)
      (let* ((v (abs n))
             (digits (loop for d fixnum from 1
                           for p of-type (unsigned-byte 64) = 10 then (* p 10)
                           while (and (< d 19) (>= v p))
                           finally (return d)))
             (start (+ (outbuf-fill buf) (if (minusp n) 1 0)))
             (octets (reserve buf (+ digits 1))))
        (declare (type (unsigned-byte 63) v) (type fixnum digits start))
        (when (minusp n) (setf (aref octets (1- start)) 45))
        (loop for i fixnum from (+ start digits -1) downto start
              do (multiple-value-bind (q r) (truncate v 10)
                   (setf (aref octets i) (+ 48 r) v q)))
        (setf (outbuf-fill buf) (+ start digits)))
      (put-chars buf (let ((*print-base* 10) (*print-radix* nil)) (princ-to-string n)))))

(defun put-short-decimal (buf d)
  "Print D (a finite double) as up to 6 decimals when those read back as exactly D, as with
0.75d0 or 0.1d0; return NIL, printing nothing, when it needs more digits.  SBCL's shortest
float printer costs about 0.35 us a number and most figures (ages, ratios) are short."
  (declare (type outbuf buf) (type double-float d) (optimize speed))
  (let ((a (abs d)))
    (when (and (< a 1d12) (not (and (zerop d) (minusp (float-sign d)))))
      (loop for k fixnum from 0 to 6
            for scale of-type double-float = 1d0 then (* scale 10d0)
            for p of-type fixnum = 1 then (* p 10)
            do (let ((m (round (* a scale))))
                 (declare (type fixnum m))
                 ;; Division is correctly rounded, as is the peer's decimal reader: when m/10^k
                 ;; rounds to D here, the text m/10^k reads back as D there.
                 (when (= (/ (float m 1d0) scale) a)
                   (multiple-value-bind (whole fraction) (floor m p)
                     (when (minusp d) (put-byte buf 45))
                     (put-integer buf whole)
                     (put-byte buf 46)
                     (if (zerop k)
                         (put-byte buf 48)
                         (loop for q of-type fixnum = (floor p 10) then (floor q 10)
                               while (plusp q)
                               do (multiple-value-bind (digit rest) (floor fraction q)
                                    (put-byte buf (+ 48 digit))
                                    (setf fraction rest))))
                     (put-chars buf "d0")
                     (return t))))))))

(defun put-real (buf x)
  "X as a double the peer reads back exactly (e.g. 0.75d0); NIL when it is not finite."
  (let ((d (handler-case (coerce x 'double-float) (error () nil))))
    (cond ((not (and d (finite-double-p d))) (put-chars buf "nil"))
          ((put-short-decimal buf d))
          (t (put-chars buf (let ((*read-default-float-format* 'single-float))
                             (prin1-to-string d)))))))

(defun put-keyword-name (buf name)
  (put-byte buf 58)
  (put-chars buf name :downcase t))

(defun put-payload (buf x &optional (depth 0))
  (declare (type outbuf buf) (type fixnum depth))
  (cond ((null x) (put-chars buf "nil"))
        ((eq x t) (put-byte buf 116))
        ((keywordp x) (put-keyword-name buf (symbol-name x)))
        ((unknown-keyword-p x)
         (put-byte buf 58)
         (put-chars buf (unknown-keyword-name x)))
        ((stringp x) (put-string-literal buf x))
        ((integerp x) (put-integer buf x))
        ((realp x) (put-real buf x))
        ((consp x)
         (if (>= depth +max-depth+)
             (put-string-literal buf "...")
             (progn
               (put-byte buf 40)
               (loop for tail = x then (cdr tail)
                     for i fixnum from 0
                     while (consp tail)
                     do (when (> i 0) (put-byte buf 32))
                        (if (>= i 100000)
                            (progn (put-string-literal buf "...") (return))
                            (put-payload buf (car tail) (1+ depth)))
                     finally (when tail
                               (put-byte buf 32)
                               (put-string-literal
                                buf (safe-string (lambda (s) (princ tail s)) +message-limit+))))
               (put-byte buf 41))))
        (t (put-string-literal buf (safe-string (lambda (s) (princ x s)) +message-limit+)))))

(defun encode-frame (message)
  "MESSAGE printed into a frame: a simple octet vector with its 6 hex digit header.
Signals TOO-LARGE beyond the frame limit."
  (let ((buf (make-outbuf)))
    (put-payload buf message)
    (let* ((fill (outbuf-fill buf))
           (n (- fill +header-bytes+))
           (octets (outbuf-octets buf)))
      (when (> n +max-out-frame+)
        (too-large n))
      (loop for i from (1- +header-bytes+) downto 0
            for v = n then (ash v -4)
            do (setf (aref octets i) (char-code (char "0123456789abcdef" (logand v 15)))))
      (values octets fill))))

(defun show-arg (v &optional (limit 100))
  "V as the peer wrote it, cut to LIMIT characters, for error messages; never signals."
  (handler-case
      (let* ((buf (make-outbuf))
             (text (progn (put-payload buf v)
                          (sb-ext:octets-to-string (outbuf-octets buf)
                                                   :start +header-bytes+ :end (outbuf-fill buf)
                                                   :external-format :utf-8))))
        (one-line text limit))
    (serious-condition () "#<unprintable>")))

;;;; ------------------------------------------------------------------------
;;;; GC pause recording: preallocated arrays, seqlock, no consing on the GC path

(deftype ring-fixnums () `(simple-array fixnum (,+ring-size+)))

;; **stats** slots
(defconstant +s-seq+ 0)          ; seqlock counter: odd while a writer is active
(defconstant +s-count+ 1)        ; pauses recorded since agent start
(defconstant +s-sum-ns+ 2)
(defconstant +s-max-ns+ 3)
(defconstant +s-last-ns+ 4)
(defconstant +s-freed+ 5)
(defconstant +s-dropped+ 6)
(defconstant +s-size+ 8)

(sb-ext:defglobal **stats** (make-array +s-size+ :element-type 'fixnum :initial-element 0))
(sb-ext:defglobal **last-time** (make-array 1 :element-type 'double-float :initial-element 0d0))
(sb-ext:defglobal **writer-lock** (make-array 1 :initial-element nil))
(sb-ext:defglobal **r-seq** (make-array +ring-size+ :element-type 'fixnum :initial-element 0))
(sb-ext:defglobal **r-gen** (make-array +ring-size+ :element-type 'fixnum :initial-element 0))
(sb-ext:defglobal **r-wall-ns** (make-array +ring-size+ :element-type 'fixnum :initial-element 0))
(sb-ext:defglobal **r-cpu-us** (make-array +ring-size+ :element-type 'fixnum :initial-element 0))
(sb-ext:defglobal **r-before** (make-array +ring-size+ :element-type 'fixnum :initial-element 0))
(sb-ext:defglobal **r-after** (make-array +ring-size+ :element-type 'fixnum :initial-element 0))
(sb-ext:defglobal **r-time** (make-array +ring-size+ :element-type 'double-float :initial-element 0d0))
(sb-ext:defglobal **h-counts** (make-array (* +generations+ +buckets+) :element-type 'fixnum
                                                                      :initial-element 0))
(sb-ext:defglobal **h-count** (make-array +generations+ :element-type 'fixnum :initial-element 0))
(sb-ext:defglobal **h-sum-ns** (make-array +generations+ :element-type 'fixnum :initial-element 0))
(sb-ext:defglobal **bucket-ns**
    (make-array 16 :element-type 'fixnum
                   :initial-contents '(100000 250000 500000 1000000 2500000 5000000
                                       10000000 25000000 50000000 100000000 250000000
                                       500000000 1000000000 2500000000 5000000000
                                       10000000000)))
(sb-ext:defglobal **recording-enabled** nil)

(declaim (type (simple-array fixnum (*)) **stats** **h-counts** **h-count** **h-sum-ns** **bucket-ns**)
         (type (simple-array fixnum (64)) **r-seq** **r-gen** **r-wall-ns** **r-cpu-us**
               **r-before** **r-after**)
         (type (simple-array double-float (64)) **r-time**)
         (type (simple-array double-float (1)) **last-time**)
         (type simple-vector **writer-lock**))

(defvar *in-recorded-gc* nil
  "Bound to T (per thread) inside an outermost wrapped GC call, so nested calls pass through.")

(defun reset-gc-stats ()
  (fill **stats** 0)
  (fill **last-time** 0d0)
  (setf (svref **writer-lock** 0) nil)
  (dolist (a (list **r-seq** **r-gen** **r-wall-ns** **r-cpu-us** **r-before** **r-after**))
    (fill a 0))
  (fill **r-time** 0d0)
  (fill **h-counts** 0)
  (fill **h-count** 0)
  (fill **h-sum-ns** 0))

(defun record-pause (gen wall-ns cpu-us heap-before heap-after)
  "Record one GC pause.  Conses nothing; never blocks (a contended writer spin is bounded)."
  (declare (optimize (speed 3) (safety 0) (debug 0))
           (type fixnum gen wall-ns cpu-us heap-before heap-after))
  (without-interrupts*
    (let ((lockv **writer-lock**))
      (unless (loop repeat 1000000
                    thereis (null (sb-ext:compare-and-swap (svref lockv 0) nil t)))
        (incf (aref **stats** +s-dropped+))
        (return-from record-pause nil))
      (unwind-protect
           (let* ((stats **stats**)
                  (gen (max 0 (min (1- +generations+) gen)))
                  (wall-ns (max 0 wall-ns))
                  (cpu-us (max 0 cpu-us))
                  (seq (1+ (aref stats +s-count+)))
                  (slot (logand (1- seq) (1- +ring-size+)))
                  (bucket (let ((b **bucket-ns**))
                            (loop for i of-type fixnum from 0 below 16
                                  when (<= wall-ns (aref b i)) return i
                                  finally (return 16)))))
             (declare (type fixnum seq slot bucket gen wall-ns cpu-us))
             (multiple-value-bind (sec usec) (sb-ext:get-time-of-day)
               (declare (type (unsigned-byte 40) sec) (type (unsigned-byte 32) usec))
               (let ((now (+ (coerce sec 'double-float)
                             (* (coerce usec 'double-float) 1d-6))))
                 (declare (type double-float now))
                 ;; seqlock: odd while writing
                 (setf (aref stats +s-seq+) (logand (1+ (aref stats +s-seq+)) most-positive-fixnum))
                 (sb-thread:barrier (:write))
                 (setf (aref **r-seq** slot) seq
                       (aref **r-gen** slot) gen
                       (aref **r-wall-ns** slot) wall-ns
                       (aref **r-cpu-us** slot) cpu-us
                       (aref **r-before** slot) heap-before
                       (aref **r-after** slot) heap-after
                       (aref **r-time** slot) now)
                 (setf (aref stats +s-count+) seq)
                 (setf (aref stats +s-sum-ns+) (+ (aref stats +s-sum-ns+) wall-ns))
                 (when (> wall-ns (aref stats +s-max-ns+))
                   (setf (aref stats +s-max-ns+) wall-ns))
                 (setf (aref stats +s-last-ns+) wall-ns)
                 (when (> heap-before heap-after)
                   (setf (aref stats +s-freed+) (+ (aref stats +s-freed+) (- heap-before heap-after))))
                 (setf (aref **last-time** 0) now)
                 (let ((hi (+ (* gen +buckets+) bucket)))
                   (setf (aref **h-counts** hi) (1+ (aref **h-counts** hi))))
                 (setf (aref **h-count** gen) (1+ (aref **h-count** gen)))
                 (setf (aref **h-sum-ns** gen) (+ (aref **h-sum-ns** gen) wall-ns))
                 (sb-thread:barrier (:write))
                 (setf (aref stats +s-seq+) (logand (1+ (aref stats +s-seq+)) most-positive-fixnum)))))
        (setf (svref lockv 0) nil))))
  nil)

(defun call-timed-gc (fn args requested-gen sub-gc-p)
  "Call FN on ARGS (a GC entry point), timing it and recording one pause if this call
collected.  For SUB-GC the return value tells (T: this call collected; 0 or NIL: another
thread collected or GC is inhibited); for SB-EXT:GC, whose value says nothing, a change
of n_gcs (or of *gc-epoch*) does."
  (declare (optimize (speed 2) (safety 0) (debug 0))
           (type function fn) (type list args) (type fixnum requested-gen))
  (let ((before (make-array +generations+ :element-type 'fixnum :initial-element 0)))
    (declare (dynamic-extent before))
    (dotimes (g +generations+)
      (setf (aref before g) (sb-ext:generation-number-of-gcs g)))
    (let ((n0 (n-gcs))
          (epoch0 (gc-epoch))
          (cpu0 sb-ext:*gc-run-time*)
          (heap0 (the fixnum (heap-used)))
          (t0 (mono-ns)))
      (declare (type fixnum n0 t0 heap0) (type unsigned-byte cpu0))
      (let ((result (apply fn args)))
        (let ((t1 (mono-ns))
              (heap1 (the fixnum (heap-used)))
              (cpu1 sb-ext:*gc-run-time*)
              (n1 (n-gcs)))
          (declare (type fixnum t1 n1))
          (when (and **recording-enabled**
                     (cond ((and sub-gc-p (eq result t)) t)
                           ((and sub-gc-p (or (null result) (eql result 0))) nil)
                           ((>= n0 0) (/= n0 n1))
                           (t (or (null epoch0) (not (eq epoch0 (gc-epoch)))))))
            (let ((gen requested-gen))
              (declare (type fixnum gen))
              (dotimes (g +generations+)
                (when (and (> g gen)
                           (/= (aref before g) (the fixnum (sb-ext:generation-number-of-gcs g))))
                  (setf gen g)))
              (record-pause gen (- t1 t0)
                            (- (the fixnum cpu1) (the fixnum cpu0))
                            heap0 heap1))))
        result))))

(defun sub-gc-wrapper (fn &rest args)
  (declare (dynamic-extent args) (type function fn))
  (if *in-recorded-gc*
      (apply fn args)
      (let ((*in-recorded-gc* t))
        (call-timed-gc fn args (let ((g (first args))) (if (typep g 'fixnum) g 0)) t))))

(defun gc-wrapper (fn &rest args)
  (declare (dynamic-extent args) (type function fn))
  (if *in-recorded-gc*
      (apply fn args)
      (let ((*in-recorded-gc* t))
        (call-timed-gc fn args
                       (cond ((getf args :full) (1- +generations+))
                             ((typep (getf args :gen) 'fixnum) (getf args :gen))
                             (t 0))
                       nil))))

(defparameter *gc-encapsulations* '()
  "The (function-name . encapsulation-name) pairs currently installed.")

(defun remove-gc-wrappers ()
  (setf **recording-enabled** nil)
  (dolist (e *gc-encapsulations*)
    (ignore-errors (unencapsulate (car e) (cdr e))))
  (setf *gc-encapsulations* '()))

(defun install-gc-wrappers ()
  (when (and (null *gc-encapsulations*) (capability-internals-present-p :pause-timing))
    (handler-case
        (progn
          (encapsulate (sub-gc-name) 'sbmon-pause #'sub-gc-wrapper)
          (push (cons (sub-gc-name) 'sbmon-pause) *gc-encapsulations*)
          (encapsulate 'sb-ext:gc 'sbmon-pause #'gc-wrapper)
          (push (cons 'sb-ext:gc 'sbmon-pause) *gc-encapsulations*))
      (serious-condition ()
        (remove-gc-wrappers))))
  (setf **recording-enabled** (and *gc-encapsulations* t)))

(defun pause-timing-p () (and *gc-encapsulations* t))

(defstruct (gc-snapshot (:type vector))
  count sum-ns max-ns last-ns freed last-time
  records              ; list of plists, oldest first
  hist-counts hist-count hist-sum-ns)

(defun read-gc-snapshot (&key (records t) (histograms t))
  "Copy the recorder's state consistently (seqlock read with a few retries)."
  (let ((stats **stats**) (snap nil))
    (dotimes (attempt 20 snap)
      (let ((s1 (aref stats +s-seq+)))
        (cond
          ((oddp s1) (sb-thread:thread-yield))
          (t
           (sb-thread:barrier (:read))
           (let* ((count (aref stats +s-count+))
                  (new (make-gc-snapshot
                        :count count
                        :sum-ns (aref stats +s-sum-ns+)
                        :max-ns (aref stats +s-max-ns+)
                        :last-ns (aref stats +s-last-ns+)
                        :freed (aref stats +s-freed+)
                        :last-time (aref **last-time** 0)
                        :records (when records
                                   (loop for seq from (max 1 (- count (1- +ring-size+))) to count
                                         for slot = (logand (1- seq) (1- +ring-size+))
                                         collect (list :seq (aref **r-seq** slot)
                                                       :generation (aref **r-gen** slot)
                                                       :wall-seconds (/ (aref **r-wall-ns** slot) 1d9)
                                                       :cpu-seconds (/ (aref **r-cpu-us** slot) 1d6)
                                                       :heap-before (aref **r-before** slot)
                                                       :heap-after (aref **r-after** slot)
                                                       :time (aref **r-time** slot))))
                        :hist-counts (when histograms (copy-seq **h-counts**))
                        :hist-count (when histograms (copy-seq **h-count**))
                        :hist-sum-ns (when histograms (copy-seq **h-sum-ns**)))))
             (sb-thread:barrier (:read))
             (setf snap new)
             (when (= s1 (aref stats +s-seq+))
               (return snap)))))))))

;;;; ------------------------------------------------------------------------
;;;; Agent state

(defstruct (conn (:type vector) (:constructor %make-conn))
  (id 0)
  stream (fd -1)        ; the input stream over the descriptor FD, which it closes
  (tcp nil)
  (write-lock (sb-thread:make-mutex :name "sbmon-agent conn write"))
  (lock (sb-thread:make-mutex :name "sbmon-agent conn"))
  thread
  (workers '())
  (slow 0 :type fixnum)
  (subscribed nil)
  (last-seq 0)
  (sender nil)         ; thread sending its events while subscribed (under lock)
  (events-ready (sb-thread:make-semaphore :name "sbmon-agent conn events"))
  (send-timeout +send-timeout-seconds+)
  (accepted-ns (mono-ns))  ; when the listener accepted it (CLOCK_MONOTONIC)
  (alive t)            ; replies may be sent (under write-lock)
  (closed nil))        ; the descriptor was closed (under lock)

(defvar *state-lock* (sb-thread:make-mutex :name "sbmon-agent state"))
(defvar *start-stop-lock* (sb-thread:make-mutex :name "sbmon-agent start/stop")
  "Serializes START and STOP.")
(defvar *running* nil)
(defvar *address* nil)
(defvar *socket-path* nil)
(defvar *socket-dir* nil
  "The default socket directory when the agent listens there (recreated with the socket).")
(defvar *exiting* nil
  "Set by the exit hook: the image is exiting, nothing may be accepted or recreated.")
(defvar *listener* nil)
(defvar *listener-thread* nil)
(defvar *event-thread* nil)
(defvar *event-wakeup* (sb-thread:make-semaphore :name "sbmon-agent events")
  "Signalled to end the event thread's wait early: a new subscriber, or stop.")
(defvar *connections* '())
(defvar *conn-counter* 0)
(defvar *tcp-token* nil)
(defvar *tcp-mode* nil)
(defvar *allow* '(:read)
  "Classes of operations this agent serves (START's :ALLOW): :read, and :control, :eval.")
(defvar *hello-timeout* +hello-timeout+
  "Seconds a new connection has to send its hello (START's :HELLO-TIMEOUT).")
(defvar *start-time* 0d0)
(defvar *name* nil
  "The image's name (START's :NAME), or NIL: sbmon names the target by it.")
(defvar *pending-backtraces*
  (make-hash-table :test 'eq :weakness :key :synchronized t)
  "thread -> backtrace box whose interrupt has not run yet (waiter gave up).")

(defun address ()
  "Return the address the agent listens on (a socket path or \"127.0.0.1:PORT\"), or NIL."
  *address*)

(defun now-epoch ()
  (multiple-value-bind (sec usec) (sb-ext:get-time-of-day)
    (+ (coerce sec 'double-float) (/ usec 1d6))))

(defvar *threads-lock* (sb-thread:make-mutex :name "sbmon-agent threads"))
(defvar *agent-threads* '()
  "Every thread the agent started that has not ended yet.  The agent knows its threads by
identity, never by name: a user thread may be called \"sbmon-agent ...\" too.")

(defun agent-thread-p (thread)
  "True when THREAD was started by the agent."
  (and (sb-thread:with-mutex (*threads-lock*) (member thread *agent-threads* :test #'eq)) t))

(defun agent-threads ()
  (sb-thread:with-mutex (*threads-lock*) (copy-list *agent-threads*)))

(defun call-quietly (fn)
  "Run FN as the body of an agent thread: no output to the host, no debugger, ever."
  (catch 'agent-thread-abort
    (let ((*standard-output* (make-broadcast-stream))
          (*error-output* (make-broadcast-stream))
          (*trace-output* (make-broadcast-stream))
          (*debugger-hook* (lambda (c h) (declare (ignore c h)) (throw 'agent-thread-abort nil)))
          (sb-ext:*invoke-debugger-hook*
            (lambda (c h) (declare (ignore c h)) (throw 'agent-thread-abort nil))))
      (handler-bind ((warning #'muffle-warning))
        (handler-case (funcall fn)
          (serious-condition () nil))))))

(defun spawn (name fn &key (quietly t))
  "Start a thread named NAME running FN (under CALL-QUIETLY unless QUIETLY is NIL) and
track it in *AGENT-THREADS* until it ends."
  (sb-thread:with-mutex (*threads-lock*)
    (let ((thread (sb-thread:make-thread
                   (lambda ()
                     (unwind-protect (if quietly (call-quietly fn) (funcall fn))
                       (sb-thread:with-mutex (*threads-lock*)
                         (setf *agent-threads*
                               (delete sb-thread:*current-thread* *agent-threads* :test #'eq)))))
                   :name name)))
      (push thread *agent-threads*)
      thread)))

;;;; ------------------------------------------------------------------------
;;;; Framing

(defun send-frame (conn message)
  "Print MESSAGE and send it as one frame on CONN.  Returns T on success."
  (multiple-value-bind (octets end) (handler-case (encode-frame message)
                                      (error (c)
                                        (if (agent-condition-p c :too-large)
                                            nil
                                            (error c))))
    (and octets (send-octets conn octets end))))

(defun send-octets (conn octets end)
  "Send the frame in OCTETS below END in one write, so the peer wakes once.  A peer that
takes no data for +SEND-TIMEOUT-SECONDS+ (a full socket buffer) is disconnected."
  (let ((ok nil) (failed nil))
    (sb-thread:with-mutex ((conn-write-lock conn))
      (when (conn-alive conn)
        (setf ok (send-all (conn-fd conn) octets end :timeout (conn-send-timeout conn)))
        (unless ok (setf (conn-alive conn) nil failed t))))
    (when failed
      (conn-shutdown conn))
    ok))

(defun send-reply (conn id result)
  "RESULT is (:ok VALUE) or (:error ...).  Replaces a reply that cannot be sent by an error."
  (multiple-value-bind (octets end)
      (handler-case (encode-frame (list :return id result))
        (serious-condition (c)
          (encode-frame (list :return id (list :error :type (condition-type-name c)
                                                  :message (condition-message c))))))
    (send-octets conn octets end)))

(defun send-bye (conn reason)
  (ignore-errors (send-frame conn (list :bye :reason reason))))

(defun read-exactly (stream buffer)
  "Fill BUFFER from STREAM; return NIL on end of file (or a short read)."
  (= (read-sequence buffer stream) (length buffer)))

(defun hex-header-length (header)
  (let ((n 0))
    (loop for b across header
          for d = (cond ((<= 48 b 57) (- b 48))
                        ((<= 97 b 102) (- b 87))
                        ((<= 65 b 70) (- b 55)))
          do (unless d
               (frame-error
                      (format nil "bad frame header ~s (expected 6 hex digits)"
                                    (map 'string (lambda (b) (if (<= 32 b 126) (code-char b) #\?))
                                         header))))
             (setf n (+ (* n 16) d)))
    n))

(defun read-frame (stream)
  "Read one frame; return its payload string, or NIL at end of file."
  (let ((header (make-array 6 :element-type '(unsigned-byte 8))))
    (unless (read-exactly stream header) (return-from read-frame nil))
    (let ((len (hex-header-length header)))
      (when (> len +max-in-frame+)
        (frame-error
               (format nil "frame too large: ~d bytes (limit ~d)" len +max-in-frame+)))
      (let ((payload (make-array len :element-type '(unsigned-byte 8))))
        (unless (read-exactly stream payload) (return-from read-frame nil))
        (handler-case (sb-ext:octets-to-string payload :external-format :utf-8)
          (error () (malformed "payload is not valid UTF-8")))))))

;;;; ------------------------------------------------------------------------
;;;; Events

(defun subscribers ()
  (sb-thread:with-mutex (*state-lock*)
    (remove-if-not #'conn-subscribed *connections*)))

(defun event-loop ()
  "Body of the event thread.  Polls the pause counter: 40 times a second while a connection
is subscribed, once a second otherwise (the image pays for every wake-up, about 0.1 ms of
CPU each), and wakes each subscriber's sender when there are new pauses.  It never sends
anything itself, so no peer can hold it up."
  (let ((seen (aref **stats** +s-count+)))
    (loop while *running*
          do (sb-thread:wait-on-semaphore *event-wakeup* :timeout (if (subscribers) 0.025 1))
             (let ((count (aref **stats** +s-count+)))
               (when (/= count seen)
                 (setf seen count)
                 (dolist (conn (subscribers))
                   (sb-thread:signal-semaphore (conn-events-ready conn))))))))

(defun send-new-events (conn)
  "Send CONN the recorded pauses it has not seen yet."
  (let ((snapshot (read-gc-snapshot :histograms nil))
        (last (conn-last-seq conn)))
    (when snapshot
      (dolist (r (gc-snapshot-records snapshot))
        (when (> (getf r :seq) last)
          (unless (send-frame conn (list :event :gc r)) (return))
          (setf last (getf r :seq))))
      (setf (conn-last-seq conn) last))))

(defun event-sender-loop (conn)
  "Body of a subscribed connection's sender thread: sends its events when the event thread
says there are new ones.  A peer that reads nothing blocks only this thread, and only until
the send timeout disconnects it.  Ends when the connection unsubscribes or closes."
  (loop
    (sb-thread:wait-on-semaphore (conn-events-ready conn) :timeout 1)
    (unless (sb-thread:with-mutex ((conn-lock conn))
              (or (and *running* (conn-alive conn) (conn-subscribed conn))
                  (setf (conn-sender conn) nil)))
      (return))
    (send-new-events conn)))

;;;; ------------------------------------------------------------------------
;;;; Argument helpers

(defun check-plist (args allowed op)
  (unless (and (listp args) (handler-case (evenp (length args)) (error () nil)))
    (fail "BAD-ARGUMENT" "arguments of ~(~s~) must be a plist, got ~a" op
          (show-arg args 200)))
  (loop for (k) on args by #'cddr
        do (unless (member k allowed)
             (fail "BAD-ARGUMENT" "unknown argument ~a for ~(~s~); accepted: ~:[none~;~:*~{~(~s~)~^ ~}~]"
                   (show-arg k 100) op allowed)))
  args)

(defun int-arg (args key op &key default (min 1) (max most-positive-fixnum) required)
  (let ((v (getf args key :absent)))
    (cond ((eq v :absent)
           (if required
               (fail "BAD-ARGUMENT" "~(~s~) requires ~(~s~)" op key)
               default))
          ((and (integerp v) (<= min v max)) v)
          (t (fail "BAD-ARGUMENT" "~(~s~) must be an integer in ~d..~d for ~(~s~), got ~a"
                   key min max op (show-arg v 100))))))

(defun fail-with (kind extra fmt &rest args)
  "Like FAIL, with EXTRA (a plist such as (:backtrace (...))) appended to the error reply."
  (agent-error :agent-error kind
               (let ((*print-length* 20) (*print-level* 4) (*print-pretty* nil))
                 (apply #'format nil fmt args))
               extra))

(defun number-text (x)
  "X (a real) printed plainly: 1, 0.5, 2.25."
  (if (integerp x)
      (princ-to-string x)
      (let ((*read-default-float-format* 'double-float))
        (princ-to-string (coerce x 'double-float)))))

(defun real-arg (args key op &key default min max)
  (let ((v (getf args key :absent)))
    (cond ((eq v :absent) default)
          ((and (realp v) (<= min v max)) v)
          (t (fail "BAD-ARGUMENT" "~(~s~) must be a number in ~a..~a for ~(~s~), got ~a"
                   key (number-text min) (number-text max) op (show-arg v))))))

(defun bool-arg (args key op)
  (let ((v (getf args key)))
    (unless (member v '(t nil))
      (fail "BAD-ARGUMENT" "~(~s~) must be t or nil for ~(~s~), got ~a" key op (show-arg v)))
    v))

(defun string-arg (args key op &key default required (max +max-in-frame+))
  (let ((v (getf args key :absent)))
    (cond ((eq v :absent)
           (if required
               (fail "BAD-ARGUMENT" "~(~s~) requires ~(~s~)" op key)
               default))
          ((and (stringp v) (<= (length v) max)) v)
          ((stringp v) (fail "BAD-ARGUMENT" "~(~s~) is longer than ~d characters for ~(~s~)"
                             key max op))
          (t (fail "BAD-ARGUMENT" "~(~s~) must be a string for ~(~s~), got ~a"
                   key op (show-arg v))))))

(defun seconds-since (t0-ns)
  (/ (- (mono-ns) t0-ns) 1d9))

;;;; ------------------------------------------------------------------------
;;;; Operations: memory, gc, runtime

(defun op-memory (args)
  (check-plist args '() :memory)
  (list :heap-used (heap-used)
        :heap-limit (sb-ext:dynamic-space-size)
        :bytes-consed (sb-ext:get-bytes-consed)
        :nursery-size (sb-ext:bytes-consed-between-gcs)
        :generations
        (loop for g from 0 below +generations+
              collect (list :generation g
                            :bytes (sb-ext:generation-bytes-allocated g)
                            :gc-count (sb-ext:generation-number-of-gcs g)
                            :bytes-consed-between-gcs (sb-ext:generation-bytes-consed-between-gcs g)
                            :number-of-gcs-before-promotion
                            (sb-ext:generation-number-of-gcs-before-promotion g)
                            :minimum-age-before-gc
                            (coerce (sb-ext:generation-minimum-age-before-gc g) 'double-float)
                            :average-age (coerce (sb-ext:generation-average-age g) 'double-float)))))

(defun op-gc (args)
  (check-plist args '() :gc)
  (let* ((snap (read-gc-snapshot))
         (n (n-gcs))
         (timing (pause-timing-p)))
    (list :gc-count (if (>= n 0) n (gc-snapshot-count snap))
          :gc-count-source (if (>= n 0) "n_gcs" "agent")
          :gc-cpu-seconds (/ sb-ext:*gc-run-time* (coerce internal-time-units-per-second 'double-float))
          :agent-start-time *start-time*
          :pause-timing timing
          :measured-by (list :count (if (>= n 0) "C global n_gcs" "GCs seen by the agent since it started")
                             :cpu "sb-ext:*gc-run-time*"
                             :pause (if timing
                                        "wall time around sb-kernel::sub-gc and sb-ext:gc, CLOCK_MONOTONIC"
                                        "not measured (sb-kernel::sub-gc could not be wrapped)"))
          :pauses (list :count (gc-snapshot-count snap)
                        :sum-seconds (/ (gc-snapshot-sum-ns snap) 1d9)
                        :max-seconds (/ (gc-snapshot-max-ns snap) 1d9)
                        :last-seconds (/ (gc-snapshot-last-ns snap) 1d9)
                        :last-time (gc-snapshot-last-time snap)
                        :bytes-freed (gc-snapshot-freed snap))
          :buckets *bucket-bounds*
          :histograms
          (loop for g from 0 below +generations+
                for c = (aref (gc-snapshot-hist-count snap) g)
                when (plusp c)
                  collect (list :generation g
                                :count c
                                :sum-seconds (/ (aref (gc-snapshot-hist-sum-ns snap) g) 1d9)
                                :counts (loop for b from 0 below +buckets+
                                              collect (aref (gc-snapshot-hist-counts snap)
                                                            (+ (* g +buckets+) b)))))
          :recent (gc-snapshot-records snap))))

(defun op-runtime (args)
  (check-plist args '() :runtime)
  (let ((features (loop for f in *features*
                        for i from 0 below 200
                        collect (if (symbolp f) (symbol-name f) (safe-string (lambda (s) (princ f s)) 100)))))
    (list :pid (os-getpid)
          :lisp-implementation (lisp-implementation-type)
          :lisp-version (lisp-implementation-version)
          :agent-version *version*
          :machine-type (machine-type)
          :software-version (software-version)
          :features-count (length *features*)
          :features features
          :package-count (length (list-all-packages))
          :thread-count (length (sb-thread:list-all-threads))
          :internal-time-units-per-second internal-time-units-per-second)))

(defun op-ping (args)
  (check-plist args '() :ping)
  (list :pong t))

;;;; ------------------------------------------------------------------------
;;;; Threads

(defun thread-tid (thread)
  (let ((tid (ignore-errors (os-thread-id thread))))
    (and (integerp tid) (plusp tid) tid)))

(defun main-thread-p (thread)
  (eq thread (ignore-errors (main-lisp-thread))))

(defun thread-daemon-p (thread)
  (and (ignore-errors (system-thread-p thread)) t))

(defun object-name-string (name)
  (cond ((null name) "")
        ((stringp name) name)
        (t (safe-string (lambda (s) (princ name s)) 200))))

;; what each waiting thread was first seen waiting on by a :threads call, and when
(defvar *waits-lock* (sb-thread:make-mutex :name "sbmon-agent waits"))
(defvar *waits-seen* (make-hash-table :test 'eq :weakness :key)
  "thread -> (object . CLOCK_MONOTONIC ns): the object THREAD waited on when a :threads call
first saw it waiting there.  Rebuilt from the waits of the threads listed by every :threads
call, so it holds at most one entry per waiting thread.")

(defun blocked-object (thread)
  "The object THREAD waits on (a mutex, waitqueue, semaphore, ...), or NIL."
  (let ((w (ignore-errors (thread-blocker thread))))
    (if (consp w) (cdr w) w)))   ; (timeout . object) in some versions

(defun note-waits (waits now)
  "WAITS: (thread . object) of every waiting thread listed now.  Returns a table thread ->
seconds since a :threads call first saw it waiting on that same object (0 when first seen
now)."
  (let ((seconds (make-hash-table :test 'eq)))
    (sb-thread:with-mutex (*waits-lock*)
      (let ((seen (make-hash-table :test 'eq :weakness :key)))
        (loop for (thread . object) in waits
              for old = (gethash thread *waits-seen*)
              for entry = (if (and old (eq (car old) object)) old (cons object now))
              do (setf (gethash thread seen) entry
                       (gethash thread seconds) (/ (max 0 (- now (cdr entry))) 1d9)))
        (setf *waits-seen* seen)))
    seconds))

(defun object-id (object ids)
  "A small integer naming OBJECT within one :threads reply (IDS: its table)."
  (or (gethash object ids)
      (setf (gethash object ids) (1+ (hash-table-count ids)))))

(defun waited-object-plist (object ids)
  "What a thread waits on: name, type, id within the reply, and for a mutex its owner."
  (multiple-value-bind (name type)
      (cond ((typep object 'sb-thread:mutex)
             (values (object-name-string (sb-thread:mutex-name object)) "mutex"))
            ((typep object 'sb-thread:waitqueue)
             (values (object-name-string (ignore-errors (waitqueue-label object))) "waitqueue"))
            ((typep object 'sb-thread:semaphore)
             (values (object-name-string (sb-thread:semaphore-name object)) "semaphore"))
            (t (values (safe-string (lambda (s) (princ object s)) 200)
                       (safe-string (lambda (s) (princ (type-of object) s)) 100))))
    (let ((owner (and (typep object 'sb-thread:mutex)
                      (ignore-errors (sb-thread:mutex-owner object)))))
      (list :waiting-for name
            :waiting-for-type type
            :waiting-for-id (object-id object ids)
            :owner-tid (and owner (thread-tid owner))
            :owner-name (and owner (object-name-string (sb-thread:thread-name owner)))))))

(defun thread-binding (symbol thread)
  "THREAD's value of the special variable SYMBOL, or NIL when unbound there."
  (and symbol
       (multiple-value-bind (value bound) (ignore-errors (value-in-thread symbol thread nil))
         (and bound value))))

(defun debugger-condition (thread)
  "The condition THREAD's debugger was invoked with, still unanswered, and where it was
found; NIL when THREAD is not in a debugger.  SBCL's own debugger binds
SB-DEBUG:*DEBUG-CONDITION*; SLIME's binds SWANK::*SWANK-DEBUGGER-CONDITION*."
  (let ((c (thread-binding (debug-condition-variable) thread)))
    (if (typep c 'condition)
        (values c "sb-debug:*debug-condition*")
        (let ((c (thread-binding (contrib-variable "SWANK" "*SWANK-DEBUGGER-CONDITION*") thread)))
          (and (typep c 'condition) (values c "swank::*swank-debugger-condition*"))))))

(defun deadlock-wanted (condition thread)
  "The mutex THREAD was about to wait for when SBCL signalled CONDITION, a THREAD-DEADLOCK
naming the cycle it found; NIL for any other condition."
  (ignore-errors
   (loop for entry in (deadlock-cycle condition)
         when (and (consp entry) (eq (car entry) thread))
           do (let ((m (cdr entry)))
                (when (consp m) (setf m (car m)))
                (return (and (typep m 'sb-thread:mutex) m))))))

(defun debugger-plist (thread ids)
  (multiple-value-bind (c found-by) (debugger-condition thread)
    (when c
      (let ((wanted (deadlock-wanted c thread)))
        (list :type (safe-string (lambda (s) (prin1 (type-of c) s)) 200)
              :message (condition-message c)
              :found-by found-by
              :wanted (and wanted (waited-object-plist wanted ids)))))))

(defun thread-plist (thread object ids seconds)
  (let ((name (sb-thread:thread-name thread)))
    (list* :tid (thread-tid thread)
           :name name
           :alive (and (sb-thread:thread-alive-p thread) t)
           :main (and (main-thread-p thread) t)
           :agent (agent-thread-p thread)
           :daemon (thread-daemon-p thread)
           :waiting-seconds (and object (gethash thread seconds))
           :debugger (debugger-plist thread ids)
           (if object
               (waited-object-plist object ids)
               (list :waiting-for nil :waiting-for-type nil)))))

(defun op-threads (args)
  (check-plist args '() :threads)
  (let* ((threads (sb-thread:list-all-threads))
         (objects (mapcar #'blocked-object threads))
         (seconds (note-waits (loop for th in threads for o in objects
                                    when o collect (cons th o))
                              (mono-ns)))
         (ids (make-hash-table :test 'eq)))
    (loop for th in threads
          for o in objects
          collect (thread-plist th o ids seconds))))

;;;; ------------------------------------------------------------------------
;;;; Backtraces

(defun print-frame (frame)
  (one-line (safe-string (lambda (s) (prin1 frame s)) (* 2 +frame-chars+)) +frame-chars+))

(defun capture-frames (max-frames from)
  "List of printed frames of the current thread (at most MAX-FRAMES) and a truncated flag."
  (let* ((raw (list-frames :count (+ max-frames 3) :from from))
         (printed (mapcar #'print-frame raw)))
    ;; the signal context leaves a bogus frame on top of an interrupted stack
    (loop while (and printed (search "bogus stack frame" (first printed)))
          do (pop printed))
    (values (subseq printed 0 (min max-frames (length printed)))
            (> (length printed) max-frames))))

;; a box: #(state frames truncated semaphore)  state :pending :done :abandoned
(defun make-bt-box ()
  (vector :pending nil nil (sb-thread:make-semaphore :name "sbmon-agent backtrace")))

(defun queue-backtrace (thread max-frames)
  "Interrupt THREAD to capture its frames.  Return a box, or NIL if it cannot be interrupted."
  (let ((old (gethash thread *pending-backtraces*)))
    (when (and old (eq (svref old 0) :abandoned))
      ;; a previous interrupt never ran: don't queue another one, wait for that one
      (setf (svref old 0) :pending)
      (return-from queue-backtrace old)))
  (let ((box (make-bt-box)))
    (flet ((capture ()
             (handler-case
                 (let ((*print-pretty* nil))
                   (multiple-value-bind (frames truncated) (capture-frames max-frames :interrupted-frame)
                     (setf (svref box 1) frames
                           (svref box 2) truncated)))
               (serious-condition () nil))
             (setf (svref box 0) :done)
             (when (eq (gethash thread *pending-backtraces*) box)
               (remhash thread *pending-backtraces*))
             (sb-thread:signal-semaphore (svref box 3) 1)))
      (handler-case
          (progn
            (setf (gethash thread *pending-backtraces*) box)
            (sb-thread:interrupt-thread thread #'capture)
            box)
        (serious-condition ()
          (remhash thread *pending-backtraces*)
          nil)))))

(defun await-backtrace (box deadline-ns)
  "Wait for BOX until DEADLINE-NS (monotonic).  Returns T if answered."
  (when box
    (let ((remaining (/ (max 0 (- deadline-ns (mono-ns))) 1d9)))
      (or (eq (svref box 0) :done)
          (and (sb-thread:wait-on-semaphore (svref box 3) :timeout (max remaining 0.000001d0))
               t)
          (eq (svref box 0) :done)
          (progn (setf (svref box 0) :abandoned) nil)))))

(defun backtrace-result (thread answered frames truncated)
  (list :tid (thread-tid thread) :name (sb-thread:thread-name thread)
        :answered (and answered t) :frames (and answered frames) :truncated (and answered truncated)))

(defun own-backtrace (max-frames)
  (multiple-value-bind (frames truncated) (capture-frames max-frames :debugger-frame)
    (values frames truncated)))

(defun find-thread-by-tid (tid)
  (find tid (sb-thread:list-all-threads) :key #'thread-tid))

(defun backtraces-of (threads max-frames timeout-ms)
  (let* ((deadline (+ (mono-ns) (* timeout-ms 1000000)))
         (self sb-thread:*current-thread*)
         (boxes (mapcar (lambda (th)
                          (cond ((eq th self) :self)
                                ((not (sb-thread:thread-alive-p th)) nil)
                                (t (queue-backtrace th max-frames))))
                        threads)))
    (loop for th in threads
          for box in boxes
          collect (if (eq box :self)
                      (multiple-value-bind (frames truncated) (own-backtrace max-frames)
                        (backtrace-result th t frames truncated))
                      (let ((ok (await-backtrace box deadline)))
                        (backtrace-result th ok
                                          (and ok (svref box 1))
                                          (and ok (svref box 2))))))))

(defun op-backtrace (args)
  (check-plist args '(:tid :max-frames :timeout-ms) :backtrace)
  (let* ((tid (int-arg args :tid :backtrace :required t))
         (max-frames (int-arg args :max-frames :backtrace :default 40 :max 1000))
         (timeout-ms (int-arg args :timeout-ms :backtrace :default 1000 :max 60000))
         (thread (find-thread-by-tid tid)))
    (unless thread
      (fail "UNKNOWN-THREAD" "no Lisp thread with tid ~d" tid))
    (first (backtraces-of (list thread) max-frames timeout-ms))))

(defun op-backtraces (args)
  (check-plist args '(:max-frames :timeout-ms) :backtraces)
  (let* ((max-frames (int-arg args :max-frames :backtraces :default 40 :max 1000))
         (timeout-ms (int-arg args :timeout-ms :backtraces :default 1000 :max 60000)))
    (backtraces-of (remove-if-not #'sb-thread:thread-alive-p (sb-thread:list-all-threads))
                   max-frames timeout-ms)))

;;;; ------------------------------------------------------------------------
;;;; Subscribe

(defun op-subscribe (conn args)
  (check-plist args '(:events) :subscribe)
  (let ((events (getf args :events)))
    (unless (and (listp events) (every (lambda (e) (eq e :gc)) events))
      (fail "BAD-ARGUMENT" "~(:events~) must be a list of event kinds; known kinds: (:gc)"))
    (sb-thread:with-mutex ((conn-lock conn))
      (setf (conn-last-seq conn) (aref **stats** +s-count+)
            (conn-subscribed conn) (and (member :gc events) t))
      ;; events go out on a thread of this connection's own, which only this peer can block
      (when (and (conn-subscribed conn) (null (conn-sender conn)))
        (setf (conn-sender conn)
              (spawn (format nil "sbmon-agent events ~d" (conn-id conn))
                     (lambda () (event-sender-loop conn))))))
    (sb-thread:signal-semaphore (conn-events-ready conn))
    (sb-thread:signal-semaphore *event-wakeup*)
    (list :subscribed (if (member :gc events) (list :gc) nil))))

;;;; ------------------------------------------------------------------------
;;;; Control and evaluation operations: :gc-run :gc-tune :kill-thread :profile :eval
;;;; :reload-system.  The agent serves them only when START's :allow names their class
;;;; (:control, :eval; see *OPERATIONS*) and bounds every argument.  They live in
;;;; sbmon-agent-control.lisp, loaded on first use (section "Parts loaded on first use"); what
;;;; stays here is what STOP needs whether or not that part was ever loaded.

(defvar *control-threads* '()
  "Eval threads and profiling workers that are running; STOP terminates them at once.")

(defun register-control-thread (thread)
  (sb-thread:with-mutex (*state-lock*) (push thread *control-threads*)))

(defun unregister-control-thread (thread)
  (sb-thread:with-mutex (*state-lock*)
    (setf *control-threads* (remove thread *control-threads*))))

;;;; ------------------------------------------------------------------------
;;;; Parts loaded on first use: heap (:heap-histogram :heap-retainers) and control
;;;; (:gc-run :gc-tune :kill-thread :profile :eval :reload-system)
;;;;
;;;; They live in sbmon-agent-heap.lisp and sbmon-agent-control.lisp, which are not loaded
;;;; with this file: every class, condition, structure or generic function an image defines
;;;; makes each of its nursery collections slower (README, "The agent's cost to its host"),
;;;; so the resident agent carries only what the read operations need.  The contract: each
;;;; part is a file in the same directory as the loaded sbmon-agent.lisp.  The first call of
;;;; one of its operations loads it, once per image, under a lock (a second first call waits
;;;; for the first), from its fasl beside it when there is one (LOAD-PART-FILE), with all
;;;; output discarded and warnings muffled; an agent loaded from a stream (no directory
;;;; known), a missing file or a failed load makes the call fail with UNAVAILABLE naming the
;;;; file, and the next call tries again.  Loading a part by hand
;;;; after this file also works (its last form records it in *PARTS-LOADED*).

(defvar *agent-directory*
  ;; The directory of the loaded file when the parts are there (the source, or the fasl that
  ;; sbmon writes beside it); else the source's, for a fasl compiled elsewhere (ASDF's cache).
  (flet ((directory-of (p) (and p (make-pathname :name nil :type nil :version nil :defaults p))))
    (let ((loaded (directory-of *load-truename*))
          (compiled (directory-of #.(or *compile-file-truename* *load-truename*))))
      (if (and loaded (probe-file (merge-pathnames "sbmon-agent-heap.lisp" loaded)))
          loaded
          (or compiled loaded))))
  "The directory the agent's parts are loaded from, or NIL (loaded from a stream).")

(defparameter *part-files*
  '((:heap . "sbmon-agent-heap.lisp")
    (:control . "sbmon-agent-control.lisp"))
  "Each part loaded on first use, and its file beside sbmon-agent.lisp.")

(defvar *parts-loaded* '()
  "The parts loaded so far (keys of *PART-FILES*); the :runtime operation reports them.")
(defvar *part-load-lock* (sb-thread:make-mutex :name "sbmon-agent parts"))

;; The argument keywords of the parts' operations, interned here: the payload reader only
;; knows keywords that exist, and these must be known before the part that uses them is loaded.
(defparameter *part-argument-keys*
  '(:top :since :generation :max-seconds :max-heap-bytes :type :max-paths :max-depth
    :full :nursery-size :generations :bytes-consed-between-gcs
    :number-of-gcs-before-promotion :minimum-age-before-gc :tid :timeout-ms :code :package
    :timeout-s :max-output :seconds :mode :max-rows :keep-runtime-frames :cpu :alloc :time
    :system :force))

(defun part-loaded-p (part)
  (and (member part *parts-loaded*) t))

(defun note-part-loaded (part)
  "Record PART as loaded: the last form of each part's file."
  (sb-thread:with-mutex (*state-lock*)
    (pushnew part *parts-loaded*)))

(defun part-path (file)
  (and *agent-directory* (merge-pathnames file *agent-directory*)))

(defun load-part-file (path)
  "Load the fasl beside PATH (sbmon writes it, compiled in an SBCL process of its own) when
there is one and this SBCL loads it, else PATH itself.  Compiling costs the image that
compiles: the compiler's caches and interned types make each of its later nursery collections
slower, so the agent does not compile its parts in its host when it need not."
  (let ((fasl (make-pathname :type "fasl" :defaults path)))
    (unless (and (probe-file fasl) (ignore-errors (load fasl) t))
      (load path))))

(defun ensure-part (part)
  "Load PART's file unless it is loaded; UNAVAILABLE when it cannot be."
  (unless (part-loaded-p part)
    (sb-thread:with-mutex (*part-load-lock*)
      (unless (part-loaded-p part)
        (let* ((file (cdr (assoc part *part-files*)))
               (path (part-path file)))
          (unless path
            (fail "UNAVAILABLE" "these operations live in ~a, beside sbmon-agent.lisp, but this ~
                                 agent was loaded from a stream and knows no directory: load ~
                                 that file after the agent" file))
          (unless (probe-file path)
            (fail "UNAVAILABLE" "these operations need ~a, which is missing (it ships beside ~
                                 sbmon-agent.lisp)" (namestring path)))
          (handler-case
              (let* ((sink (make-broadcast-stream))
                     (*standard-output* sink) (*error-output* sink) (*trace-output* sink)
                     (*package* (find-package "SBMON-AGENT"))
                     (*readtable* (copy-readtable nil))
                     (*read-eval* t)
                     (*load-verbose* nil) (*load-print* nil)
                     (*compile-verbose* nil) (*compile-print* nil)
                     (sb-ext:*evaluator-mode* :compile))
                (handler-bind ((warning #'muffle-warning))
                  (load-part-file path)))
            (serious-condition (c)
              (fail "UNAVAILABLE" "loading ~a failed: ~a" (namestring path)
                    (condition-message c))))
          (unless (part-loaded-p part)
            (fail "UNAVAILABLE" "~a loaded but did not define its operations"
                  (namestring path))))))))

(defun part-call (part name args)
  "Call the operation function NAME of PART (a string: the symbol need not exist before the
part is loaded) with ARGS, loading the part first."
  (ensure-part part)
  (funcall (find-symbol name "SBMON-AGENT") args))

(defmacro define-part-operations (part &rest names)
  "Define NAME* for each NAME of PART: a resident stub that loads the part and calls NAME."
  `(progn
     ,@(loop for name in names
             collect `(defun ,(intern (format nil "~a*" name)) (args)
                        (part-call ,part ,(symbol-name name) args)))))

(define-part-operations :heap op-heap-histogram op-heap-retainers)
(define-part-operations :control op-gc-run op-gc-tune op-kill-thread op-profile op-eval
  op-reload-system)

;;;; ------------------------------------------------------------------------
;;;; Dispatch

(defparameter *operations*
  ;; op  function  slow-p  needs-conn  class (served only when START's :allow names it)
  '((:ping op-ping nil nil :read)
    (:memory op-memory nil nil :read)
    (:gc op-gc nil nil :read)
    (:runtime op-runtime nil nil :read)
    (:threads op-threads nil nil :read)
    (:backtrace op-backtrace t nil :read)
    (:backtraces op-backtraces t nil :read)
    (:subscribe op-subscribe nil t :read)
    ;; loaded on first use (section "Parts loaded on first use"); they walk the heap
    (:heap-histogram op-heap-histogram* t nil :read)
    (:heap-retainers op-heap-retainers* t nil :read)
    ;; loaded on first use (section "Parts loaded on first use"); :gc-tune stays a fast
    ;; operation: its first call loads the part on the connection's thread
    (:gc-run op-gc-run* t nil :control)
    (:gc-tune op-gc-tune* nil nil :control)
    (:kill-thread op-kill-thread* t nil :control)
    (:profile op-profile* t nil :control)
    ;; loading a system runs its code: as powerful as :eval, and in the same class as
    ;; sbmon's code_reload_system tool
    (:eval op-eval* t nil :eval)
    (:reload-system op-reload-system* t nil :eval)))

(defparameter *operation-classes* '(:read :control :eval)
  "The classes of operations, in the order START's :allow lists them.")

(defparameter *internal-capabilities* '(:gc-count :thread-tids :thread-kinds :thread-waits
                                        :thread-debugger :backtrace-frames)
  "Capability flags that hold when the SBCL internals they need are present (see the section
on internals): :gc-count n_gcs, :thread-tids OS thread ids (:tid, needed by :backtrace and
:kill-thread), :thread-kinds main and system threads, :thread-waits :waiting-for, :thread-debugger
:debugger (threads inside a debugger, and the mutex a THREAD-DEADLOCK stopped), :backtrace-frames the
frames of :backtrace, :backtraces and of :eval errors.")

(defun capabilities ()
  "The welcome's :capabilities: every operation implemented, :pause-timing when GC pauses
are measured, and the flags of *INTERNAL-CAPABILITIES* whose internals are present."
  (append (mapcar #'first *operations*)
          (when (pause-timing-p) (list :pause-timing))
          (remove-if-not #'capability-internals-present-p *internal-capabilities*)))

(defun normalize-allow (allow)
  "ALLOW (START's :allow) as a list of classes in canonical order, :read always included."
  (unless (and (listp allow) (every (lambda (c) (member c *operation-classes*)) allow))
    (error ":allow must be a list of ~{~s~^, ~}; got ~s" *operation-classes* allow))
  (remove-if-not (lambda (c) (or (eq c :read) (member c allow))) *operation-classes*))

(defun allowed-p (entry)
  (member (fifth entry) *allow*))

(defun not-allowed-error (entry)
  (let ((op (first entry)) (class (fifth entry)) (*print-pretty* nil))
    (list :error :type "NOT-ALLOWED"
                 :message (format nil "operation ~(~s~) needs ~(~s~) in the agent's allow set: ~
                                       start it with (sbmon-agent:start :allow '~(~s~)); it was ~
                                       started with :allow '~(~s~)"
                                  op class (normalize-allow (cons class *allow*)) *allow*))))

(defun run-operation (conn entry args)
  "Run one operation; always returns (:ok VALUE) or (:error ...)."
  (destructuring-bind (op fn slow needs-conn class) entry
    (declare (ignore op slow class))
    (handler-case
        (handler-bind ((warning #'muffle-warning))
          (list :ok (if needs-conn (funcall fn conn args) (funcall fn args))))
      (serious-condition (c)
        (list* :error :type (condition-type-name c) :message (condition-message c)
               ;; extra reply fields (:backtrace ...) carried by some agent errors
               (and (agent-condition-p c) (agent-error-extra c)))))))

(defun unknown-operation-error (op)
  (list :error :type "UNKNOWN-OPERATION"
               :message (format nil "unknown operation ~a; valid operations: ~{~(~s~)~^ ~}"
                                (show-arg op 100)
                                (mapcar #'first *operations*))))

(defun start-slow-call (conn id entry args)
  (let ((accepted nil))
    (sb-thread:with-mutex ((conn-lock conn))
      (when (< (conn-slow conn) +max-slow-calls+)
        (incf (conn-slow conn))
        (setf accepted t)))
    (if (not accepted)
        (send-reply conn id (list :error :type "BUSY"
                                         :message (format nil "~d slow calls already in flight on this connection"
                                                          +max-slow-calls+)))
        (handler-case
            (let ((thread
                    (spawn (format nil "sbmon-agent worker ~d/~d" (conn-id conn) id)
                           (lambda ()
                             (let ((released nil) (result nil))
                               (flet ((release ()
                                        (unless released
                                          (setf released t)
                                          (sb-thread:with-mutex ((conn-lock conn))
                                            (decf (conn-slow conn))
                                            (setf (conn-workers conn)
                                                  (remove sb-thread:*current-thread*
                                                          (conn-workers conn)))))))
                                 (unwind-protect
                                      (progn
                                        (setf result (run-operation conn entry args))
                                        ;; the call is no longer in flight once its reply is ready
                                        (release)
                                        (send-reply conn id result))
                                   (release))))))))
              (sb-thread:with-mutex ((conn-lock conn))
                (when (sb-thread:thread-alive-p thread)
                  (push thread (conn-workers conn)))))
          (serious-condition (c)
            (sb-thread:with-mutex ((conn-lock conn)) (decf (conn-slow conn)))
            (send-reply conn id (list :error :type (condition-type-name c)
                                             :message (condition-message c))))))))

(defun handle-message (conn msg)
  "Handle one message after the handshake.  Returns NIL when the connection must close."
  (let ((id (and (consp msg) (eq (first msg) :call) (consp (rest msg))
                 (let ((id (second msg))) (and (integerp id) (plusp id) id)))))
    (cond
      ((null id)
       (send-bye conn (if (and (consp msg) (eq (first msg) :call))
                          "malformed message: (:call ID OP ARGS) needs a positive integer ID"
                          "malformed message: expected (:call ID OP ARGS)"))
       nil)
      ((not (and (handler-case (= (length msg) 4) (error () nil))))
       (send-reply conn id (list :error :type "BAD-ARGUMENT"
                                        :message "malformed call: expected (:call ID OP ARGS)"))
       t)
      (t
       (destructuring-bind (op args) (cddr msg)
         (let ((entry (and (keywordp op) (assoc op *operations*))))
           (cond ((null entry) (send-reply conn id (unknown-operation-error op)))
                 ((not (allowed-p entry)) (send-reply conn id (not-allowed-error entry)))
                 ((third entry) (start-slow-call conn id entry args))
                 (t (send-reply conn id (run-operation conn entry args))))))
       t))))

;;;; ------------------------------------------------------------------------
;;;; Listening sockets

(defun default-socket-directory ()
  "$XDG_RUNTIME_DIR/sbmon, or /tmp/sbmon-<uid>."
  (let ((xdg (getenv-nonempty "XDG_RUNTIME_DIR")))
    (if xdg
        (concatenate 'string (string-right-trim "/" xdg) "/sbmon")
        (format nil "/tmp/sbmon-~d" (os-getuid)))))

(defun ensure-private-directory (dir)
  "Create DIR (mode 0700) if absent; refuse one that is not a directory owned by this user."
  (let ((uid (os-getuid)))
    (multiple-value-bind (kind owner) (file-kind dir)
      (case kind
        ((nil)
         (multiple-value-bind (ok errno) (os-mkdir dir #o700)
           (unless (or ok (file-kind dir))
             (error "cannot create ~a: ~a" dir (os-error-text errno))))
         (chmod dir #o700))
        (:directory
         (unless (eql owner uid)
           (error "~a is not owned by uid ~d; refusing to use it" dir uid))
         (chmod dir #o700))
        (t (error "~a exists and is not a directory" dir))))
    dir))

(defun default-socket-path (dir name)
  "<DIR>/<pid>.sock, or <DIR>/<pid>-<NAME>.sock for a named image, DIR created if need be.
The pid comes first so that sbmon tells a stale socket from a live one without connecting."
  (format nil "~a/~d~@[-~a~].sock" (ensure-private-directory dir) (os-getpid) name))

(defun check-image-name (name)
  "NAME, when it is a valid image name: 1 to 40 ASCII letters, digits, '.', '_' or '-', not
starting with '.' or '-' (it becomes part of a file name and of Prometheus labels)."
  (unless (and (stringp name) (<= 1 (length name) 40)
               (every (lambda (c) (or (char<= #\a c #\z) (char<= #\A c #\Z) (char<= #\0 c #\9)
                                      (member c '(#\. #\_ #\-))))
                      name)
               (not (member (char name 0) '(#\. #\-))))
    (error ":name must be 1 to 40 letters, digits, '.', '_' or '-' (not first), got ~s" name))
  name)

(defun socket-live-p (path)
  (let ((fd (os-socket +af-unix+)))
    (unwind-protect (and (os-connect fd (unix-address path)) t)
      (os-close fd))))

(defun open-unix-listener (path)
  (case (file-kind path)
    ((nil))
    (:socket
     (when (socket-live-p path)
       (error "another process is listening on ~a" path))
     (os-unlink path))
    (t (error "~a exists and is not a socket" path)))
  ;; non-blocking: the listener polls, and a client gone between the poll and the accept
  ;; must not block it
  (let ((address (unix-address path))
        (fd (os-socket +af-unix+ :nonblocking t)))
    (os-bind fd address)
    (chmod path #o600)
    (os-listen fd)
    fd))

(defun open-tcp-listener (port)
  (let ((fd (os-socket +af-inet+ :nonblocking t)))
    (reuse-address fd)
    (os-bind fd (loopback-address port))
    (os-listen fd)
    (values fd (bound-port fd))))

;;;; ------------------------------------------------------------------------
;;;; Connections

(defun read-secret-token ()
  (let ((path (secret-path)))
    (ensure-secret-file path)
    (with-open-file (in path :direction :input :external-format :utf-8)
      (let ((line (read-line in nil "")))
        (string-trim '(#\Space #\Tab #\Newline #\Return) line)))))

(defun secret-path ()
  (let ((home (getenv-nonempty "HOME")))
    (if home
        (concatenate 'string (string-right-trim "/" home) "/.sbmon-secret")
        (namestring (merge-pathnames ".sbmon-secret" (user-homedir-pathname))))))

(defun random-hex (nbytes)
  (let ((bytes (make-array nbytes :element-type '(unsigned-byte 8))))
    (with-open-file (in "/dev/urandom" :element-type '(unsigned-byte 8))
      (read-sequence bytes in))
    (format nil "~(~{~2,'0x~}~)" (coerce bytes 'list))))

(defun ensure-secret-file (path)
  (unless (file-kind path)
    (with-open-file (out path :direction :output :if-exists nil :if-does-not-exist :create
                              :external-format :latin-1)
      (when out
        (chmod path #o600)
        (write-line (random-hex 16) out)))))

(defun tokens-equal-p (a b)
  "Compare two strings in time that depends only on their lengths."
  (let ((diff (logxor (length a) (length b))))
    (dotimes (i (max (length a) (length b)))
      (setf diff (logior diff (logxor (if (< i (length a)) (char-code (char a i)) 0)
                                      (if (< i (length b)) (char-code (char b i)) 0)))))
    (zerop diff)))

(defun recv-exactly (fd octets deadline-ns)
  "Fill OCTETS from FD by DEADLINE-NS (CLOCK_MONOTONIC): :OK, :EOF or :TIMEOUT."
  (let ((got 0) (n (length octets)))
    (loop while (< got n)
          do (let ((r (recv-available fd octets got)))
               (cond ((null r)
                      (let ((left (- deadline-ns (mono-ns))))
                        (when (<= left 0) (return-from recv-exactly :timeout))
                        (wait-fd fd 1 (ceiling left 1000000))))
                     ((zerop r) (return-from recv-exactly :eof))
                     (t (incf got r)))))
    :ok))

(defun read-hello (conn)
  "The first frame of CONN: its payload string, NIL at end of file, or :TIMEOUT.
The deadline is absolute (CLOCK_MONOTONIC, *HELLO-TIMEOUT* seconds after the accept) and the
socket is read directly, only what has arrived: a garbage collection cannot postpone it (as
it does SB-SYS:WITH-DEADLINE) and a peer sending its hello a byte at a time is cut off too."
  (let ((fd (conn-fd conn))
        (deadline (+ (conn-accepted-ns conn) (round (* *hello-timeout* 1d9))))
        (header (make-array 6 :element-type '(unsigned-byte 8))))
    (flet ((fill-from-socket (buffer)
             (let ((outcome (recv-exactly fd buffer deadline)))
               (unless (eq outcome :ok)
                 (return-from read-hello (if (eq outcome :timeout) :timeout nil))))))
      (fill-from-socket header)
      (let ((len (hex-header-length header)))
        (when (> len +max-in-frame+)
          (frame-error
                 (format nil "frame too large: ~d bytes (limit ~d)" len +max-in-frame+)))
        (let ((payload (make-array len :element-type '(unsigned-byte 8))))
          (fill-from-socket payload)
          (handler-case (sb-ext:octets-to-string payload :external-format :utf-8)
            (error () (malformed "payload is not valid UTF-8"))))))))

(defun handshake (conn)
  "Read the hello within the timeout.  Returns T if the welcome was sent."
  (let ((payload (read-hello conn)))
    (when (eq payload :timeout)
      (send-bye conn "timeout waiting for hello")
      (return-from handshake nil))
    (unless payload (return-from handshake nil))
    (let ((msg (parse-payload payload)))
      (unless (and (consp msg) (eq (first msg) :hello)
                   (handler-case (evenp (length (rest msg))) (error () nil)))
        (send-bye conn "first message must be (:hello :protocol 1 ...)")
        (return-from handshake nil))
      (let ((plist (rest msg)))
        (unless (eql (getf plist :protocol) +protocol+)
          (send-bye conn (format nil "unsupported protocol ~a (this agent speaks ~d)"
                                 (show-arg (getf plist :protocol) 50)
                                 +protocol+))
          (return-from handshake nil))
        (when (conn-tcp conn)
          (let ((token (getf plist :token)))
            (unless (and (stringp token) *tcp-token* (tokens-equal-p token *tcp-token*))
              (send-bye conn "bad or missing token")
              (return-from handshake nil))))
        (send-frame conn (list :welcome :protocol +protocol+
                                        :agent-version *version*
                                        :name *name*
                                        :pid (os-getpid)
                                        :lisp-version (lisp-implementation-version)
                                        :capabilities (capabilities)
                                        :allow *allow*
                                        :missing-internals (missing-internals)))))))

(defun connection-loop (conn)
  (unwind-protect
       (handler-case
           (when (handshake conn)
             (loop
               (let ((payload (read-frame (conn-stream conn))))
                 (unless (and payload (conn-alive conn)) (return))
                 (unless (handle-message conn (parse-payload payload))
                   (return)))))
         (serious-condition (c)
           (cond ((agent-condition-p c :frame-error) (send-bye conn (agent-error-text c)))
                 ((agent-condition-p c :malformed)
                  (send-bye conn (format nil "malformed message: ~a" (agent-error-text c))))
                 (t nil))))
    (close-connection conn)))

(defun conn-shutdown (conn)
  "Shut CONN's socket down: its reader sees end of file and a send blocked on it returns at
once.  The descriptor stays open; once closed it is never touched again (its number may
belong to another file by then)."
  (sb-thread:with-mutex ((conn-lock conn))
    (unless (conn-closed conn)
      (fd-shutdown (conn-fd conn)))))

(defun close-connection (conn)
  ;; Shut down first: a sender blocked on a full socket holds the write lock until then.
  (conn-shutdown conn)
  (sb-thread:with-mutex ((conn-write-lock conn))
    (setf (conn-alive conn) nil))
  (sb-thread:signal-semaphore (conn-events-ready conn)) ; its sender, if any, ends
  (when (sb-thread:with-mutex ((conn-lock conn))
          (unless (conn-closed conn)
            (setf (conn-closed conn) t)))
    ;; closing the stream closes the descriptor
    (ignore-errors (close (conn-stream conn) :abort t)))
  (sb-thread:with-mutex (*state-lock*)
    (setf *connections* (remove conn *connections*))))

(defun accept-connection (fd)
  "Take the connection on descriptor FD (which the connection then owns)."
  (let* ((stream (handler-case (fd-input-stream fd (format nil "sbmon-agent connection ~d" fd))
                   (serious-condition (c) (os-close fd) (error c))))
         (conn (%make-conn :fd fd :tcp *tcp-mode* :stream stream)))
    (let ((full nil))
      (sb-thread:with-mutex (*state-lock*)
        (if (>= (length *connections*) +max-connections+)
            (setf full t)
            (progn (setf (conn-id conn) (incf *conn-counter*))
                   (push conn *connections*))))
      (cond (full
             (setf (conn-send-timeout conn) 1)
             (send-bye conn (format nil "too many connections (limit ~d)" +max-connections+))
             (close-connection conn))
            (t
             (handler-case
                 (setf (conn-thread conn)
                       (spawn (format nil "sbmon-agent conn ~d" (conn-id conn))
                              (lambda () (connection-loop conn))))
               (serious-condition () (close-connection conn))))))))

(defconstant +socket-check-ns+ 1000000000
  "How often the listener checks that its socket file still exists.")

(defun renew-listener-if-deleted (listener)
  "LISTENER, or, when its socket file was deleted (say by a /tmp cleaner), a new listener
bound at the same path (mode 0600, its private directory recreated if that went too); the
old one is closed.  A path that another file now occupies is left alone."
  (let ((path *socket-path*))
    (if (or (null path) (file-kind path))
        listener
        ;; Under the state lock, so that neither STOP nor the exit hook, which remove the
        ;; file for good, can see it come back.
        (sb-thread:with-mutex (*state-lock*)
          (let ((new (and *running* (not *exiting*) (not (file-kind path))
                          (handler-case
                              (progn (when *socket-dir* (ensure-private-directory *socket-dir*))
                                     (open-unix-listener path))
                            (serious-condition () nil)))))
            (cond (new
                   (os-close listener)
                   (setf *listener* new))
                  (t listener)))))))

(defun listener-loop (fd)
  (let ((next-check (+ (mono-ns) +socket-check-ns+)))
    (loop while (and *running* (not *exiting*))
          do (handler-case
                 (progn
                   (when (wait-fd fd 1 200)
                     (let ((client (os-accept fd)))
                       (when client
                         (if (and *running* (not *exiting*))
                             (accept-connection client)
                             (os-close client)))))
                   (when (>= (mono-ns) next-check)
                     (setf next-check (+ (mono-ns) +socket-check-ns+))
                     (setf fd (renew-listener-if-deleted fd))))
               (serious-condition () (sleep 0.05))))))

;;;; ------------------------------------------------------------------------
;;;; Start / stop

(defun start (&key socket port (hello-timeout +hello-timeout+) (allow '(:read)) name)
  "Start the agent and return its address: the Unix socket path, or \"127.0.0.1:PORT\".
With no argument, listen on <dir>/<pid>.sock (<dir> = $XDG_RUNTIME_DIR/sbmon or
/tmp/sbmon-<uid>, mode 0700; socket 0600).  :SOCKET PATH listens on that path.  :PORT N
listens on 127.0.0.1:N and requires the token from ~/.sbmon-secret (created if absent).
:HELLO-TIMEOUT (seconds, default 10) is how long a new connection may take to send its
hello before it is closed.  :ALLOW lists the classes of operations served: :read (the
figures, always served), :control (:gc-run :gc-tune :kill-thread :profile) and :eval (:eval
:reload-system); e.g. :allow '(:read :control :eval).  Any other operation is answered with
a NOT-ALLOWED error.  :NAME (1 to 40 letters, digits, '.', '_', '-') names the image: the
welcome carries it, the default socket is then <dir>/<pid>-<name>.sock, and sbmon calls the
target by it instead of pid-N, so its series survive a restart.  Calling START while running
returns the current address."
  (sb-thread:with-recursive-lock (*start-stop-lock*)
    (%start socket port hello-timeout allow name)))

(defun %start (socket port hello-timeout allow name)
  (when *running*
    (return-from %start *address*))
  (when (and socket port)
    (error "give either :socket or :port, not both"))
  (when port
    (check-type port (integer 0 65535)))
  (unless (and (realp hello-timeout) (< 0 hello-timeout 3601))
    (error ":hello-timeout must be a number of seconds in (0, 3600], got ~s" hello-timeout))
  (setf allow (normalize-allow allow))
  (when name (check-image-name name))
  (let* ((token (and port (read-secret-token)))
         (dir (and (not port) (not socket) (default-socket-directory)))
         (path (and (not port) (if socket (namestring socket) (default-socket-path dir name))))
         (listener nil) (addr nil))
    (when (and port (zerop (length token)))
      (error "~a is empty" (secret-path)))
    (if port
        (multiple-value-bind (s actual-port) (open-tcp-listener port)
          (setf listener s addr (format nil "127.0.0.1:~d" actual-port)))
        (setf listener (open-unix-listener path) addr path))
    (sb-thread:with-mutex (*state-lock*)
      (reset-gc-stats)
      (setf *start-time* (now-epoch)
            *tcp-mode* (and port t)
            *tcp-token* token
            *hello-timeout* hello-timeout
            *allow* allow
            *name* name
            *socket-path* (and (not port) path)
            *socket-dir* dir
            *exiting* nil
            *listener* listener
            *address* addr
            *connections* '()
            *running* t))
    (pushnew 'exit-cleanup sb-ext:*exit-hooks*)
    (install-gc-wrappers)
    (loop while (sb-thread:try-semaphore *event-wakeup*)) ; wake-ups left by an earlier run
    (setf *event-thread* (spawn "sbmon-agent events" #'event-loop))
    (setf *listener-thread* (spawn "sbmon-agent listener" (lambda () (listener-loop listener))))
    addr))

(defconstant +bye-budget-seconds+ 0.25d0
  "How long the exit hook may spend telling clients the image exits, all of them together.")

(defun say-bye-now (conn reason deadline-ns)
  "Send (:bye :reason REASON) to CONN without waiting on the peer (a full socket buffer
drops it) nor, for its write lock, past DEADLINE-NS; then shut the connection down."
  (handler-case
      (multiple-value-bind (octets end) (encode-frame (list :bye :reason reason))
        (sb-thread:with-mutex ((conn-write-lock conn)
                               :timeout (max 0d0 (/ (- deadline-ns (mono-ns)) 1d9)))
          (when (conn-alive conn)
            (setf (conn-alive conn) nil)
            (send-all (conn-fd conn) octets end :timeout 0))))
    (serious-condition () nil))
  (ignore-errors (conn-shutdown conn)))

(defun exit-cleanup ()
  "Exit hook: tell every client (:bye :reason \"image exiting\") and remove the agent's
socket file, when the image exits without STOP.  Bounded by +BYE-BUDGET-SECONDS+; SBCL may
run it more than once (in the exiting thread, then in the main thread)."
  (ignore-errors
   (let ((deadline (+ (mono-ns) (round (* +bye-budget-seconds+ 1d9))))
         (conns (sb-thread:with-mutex (*state-lock* :timeout +bye-budget-seconds+)
                  (setf *exiting* t)
                  (copy-list *connections*))))
     (dolist (conn conns)
       (say-bye-now conn "image exiting" deadline))))
  (ignore-errors
   (let ((path *socket-path*))
     (when (and path (eq (file-kind path) :socket))
       (os-unlink path)))))

(defun finish-thread (thread &optional (timeout 2))
  (when (and thread (not (eq thread sb-thread:*current-thread*)))
    (when (eq :timeout (sb-thread:join-thread thread :default :timeout :timeout timeout))
      (ignore-errors (sb-thread:terminate-thread thread))
      (sb-thread:join-thread thread :default nil :timeout timeout))))

(defun stop ()
  "Stop the agent: close every connection, end the threads it started (and no other), remove
its socket file, its exit hook and the GC wrappers.  Returns T if the agent was running."
  (sb-thread:with-recursive-lock (*start-stop-lock*)
    (%stop)))

(defun %stop ()
  (let (listener listener-thread event-thread conns path)
    (sb-thread:with-mutex (*state-lock*)
      (unless *running* (return-from %stop nil))
      (setf *running* nil
            listener *listener* listener-thread *listener-thread*
            event-thread *event-thread* conns (copy-list *connections*)
            path *socket-path*))
    (remove-gc-wrappers)
    ;; running evaluations and profiles end now, not after the usual grace period
    (dolist (th (sb-thread:with-mutex (*state-lock*) (copy-list *control-threads*)))
      (unless (eq th sb-thread:*current-thread*)
        (ignore-errors (sb-thread:terminate-thread th))))
    (finish-thread listener-thread)
    (ignore-errors (os-close listener))
    (when path (ignore-errors (when (eq (file-kind path) :socket) (os-unlink path))))
    (dolist (c conns)
      (conn-shutdown c)
      (sb-thread:with-mutex ((conn-write-lock c)) (setf (conn-alive c) nil)))
    (dolist (c conns)
      (finish-thread (conn-thread c))
      (dolist (w (sb-thread:with-mutex ((conn-lock c)) (copy-list (conn-workers c))))
        (finish-thread w))
      (close-connection c))
    (sb-thread:signal-semaphore *event-wakeup*)
    (finish-thread event-thread)
    ;; any other thread the agent started (a worker starting during stop, an eval thread),
    ;; and only those
    (dolist (th (agent-threads))
      (finish-thread th))
    (setf sb-ext:*exit-hooks* (remove 'exit-cleanup sb-ext:*exit-hooks*))
    (sb-thread:with-mutex (*state-lock*)
      (setf *listener* nil *listener-thread* nil *event-thread* nil
            *connections* '() *address* nil *socket-path* nil *socket-dir* nil
            *tcp-token* nil))
    t))

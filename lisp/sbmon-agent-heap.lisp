;;;; sbmon-agent-heap.lisp -- the heap operations of the sbmon agent, loaded on first use.
;;;;
;;;; This file owns :heap-histogram (the live objects of the dynamic space by type, with the
;;;; last snapshots kept for :since) and :heap-retainers (the paths that keep a sample of
;;;; one type alive, from SB-EXT:SEARCH-ROOTS).  It is part of the agent (package
;;;; SBMON-AGENT) but is not loaded with it: the resident agent stays small, since an image
;;;; pays on every nursery collection for what the agent defines (its structures here).
;;;; sbmon-agent.lisp loads it, once, on the first call of either operation, from the
;;;; directory sbmon-agent.lisp was loaded from (section "Parts loaded on first use" there);
;;;; loading it by hand after the agent works too.
;;;;
;;;; Like the rest of the agent it never prints, never lets a condition reach the debugger
;;;; (the operations run under RUN-OPERATION's handler, and every walk under its own), and
;;;; keeps bounded memory: the walk itself conses nothing per object (preallocated tables),
;;;; and at most +max-heap-snapshots+ snapshots are kept.  Every SBCL internal it uses is
;;;; reached through DEFINE-INTERNAL below; a missing one makes the operation that needs it
;;;; answer UNAVAILABLE naming it, and leaves the rest of the agent alone.
;;;;
;;;; Sections: internals; naming objects; the walk; snapshots; :heap-histogram;
;;;; :heap-retainers.

(in-package #:sbmon-agent)

;;;; ------------------------------------------------------------------------
;;;; Internals (see the section of that name in sbmon-agent.lisp)

(define-internal walk-dynamic-space (fun generation-mask type-mask type-constraint)
    ("SB-VM" "WALK-DYNAMIC-SPACE" :capability :heap-walk)
  (fail "UNAVAILABLE" "this SBCL has no SB-VM::WALK-DYNAMIC-SPACE"))

(define-internal object-wrapper (x) ("SB-KERNEL" "WRAPPER-OF" :capability :heap-walk))
(define-internal wrapper-classoid (w) ("SB-KERNEL" "WRAPPER-CLASSOID" :capability :heap-walk))
(define-internal classoid-name (c) ("SB-KERNEL" "CLASSOID-NAME" :capability :heap-walk))
(define-internal classoid-of (x) ("SB-KERNEL" "CLASSOID-OF" :capability :heap-walk))
(define-internal find-classoid (name) ("SB-KERNEL" "FIND-CLASSOID" :capability :heap-retainers))
(define-internal object-address (x) ("SB-KERNEL" "GET-LISP-OBJ-ADDRESS" :capability :heap-walk) 0)
(define-internal widetag-of (x) ("SB-KERNEL" "WIDETAG-OF" :capability :heap-walk) -1)
(define-internal object-generation (x) ("SB-KERNEL" "GENERATION-OF"))
;; zeroes the unused part of the control stack: see CALL-ON-OWN-THREAD
(define-internal scrub-control-stack () ("SB-SYS" "SCRUB-CONTROL-STACK"))
(define-internal search-roots-name ()
    ("SB-EXT" "SEARCH-ROOTS" :capability :heap-retainers :as :function))
;; slot names of structure instances in retainer paths (word indices without them)
(define-internal wrapper-info (w) ("SB-KERNEL" "WRAPPER-INFO"))
(define-internal dd-slots (dd) ("SB-KERNEL" "DD-SLOTS"))
(define-internal dsd-index (dsd) ("SB-KERNEL" "DSD-INDEX"))
(define-internal dsd-name (dsd) ("SB-KERNEL" "DSD-NAME"))

(define-internal instance-widetag () ("SB-VM" "INSTANCE-WIDETAG" :as :value :capability :heap-walk) -1)
(define-internal funcallable-instance-widetag ()
    ("SB-VM" "FUNCALLABLE-INSTANCE-WIDETAG" :as :value :capability :heap-walk) -1)
(define-internal filler-widetag () ("SB-VM" "FILLER-WIDETAG" :as :value :capability :heap-walk) -1)
(define-internal cons-typecode () ("SB-VM" "LIST-POINTER-LOWTAG" :as :value :capability :heap-walk) -1)
(define-internal closure-widetag () ("SB-VM" "CLOSURE-WIDETAG" :as :value) -1)
(define-internal code-widetag () ("SB-VM" "CODE-HEADER-WIDETAG" :as :value) -1)
(define-internal symbol-value-word () ("SB-VM" "SYMBOL-VALUE-SLOT" :as :value) -1)
(define-internal instance-slots-word () ("SB-VM" "INSTANCE-SLOTS-OFFSET" :as :value) -1)
(define-internal vector-data-word () ("SB-VM" "VECTOR-DATA-OFFSET" :as :value) -1)

(defmacro without-gcing* (&body body)
  "BODY with garbage collection inhibited (SB-SYS:WITHOUT-GCING): no object moves and no
thread's collection can start until BODY ends; threads that need one wait."
  (let ((m (find-internal "SB-SYS" "WITHOUT-GCING")))
    (if (internal-present-p m :macro)
        `(,m ,@body)
        `(fail "UNAVAILABLE" "this SBCL has no SB-SYS:WITHOUT-GCING"))))
(note-internal "SB-SYS::WITHOUT-GCING" :heap-walk
               (internal-present-p (find-internal "SB-SYS" "WITHOUT-GCING") :macro))

(defun require-capability (capability what)
  (unless (capability-internals-present-p capability)
    (fail "UNAVAILABLE" "~a needs SBCL internals this image lacks: ~{~a~^, ~}" what
          (loop for (name needed-by present) in *internals*
                when (and (eq needed-by capability) (not present)) collect name))))

;;;; ------------------------------------------------------------------------
;;;; Naming objects
;;;;
;;;; Instances and funcallable instances are named by their class (one name per wrapper,
;;;; cached weakly); every other object by its widetag, named once from the first object of
;;;; that widetag seen.  Names are strings: a symbol's name qualified by its package name
;;;; (not for COMMON-LISP), or a type specifier for arrays.

(defun qualified-name (symbol)
  "SYMBOL as PACKAGE::NAME (PACKAGE:NAME when external; bare for COMMON-LISP)."
  (let ((pkg (symbol-package symbol)) (name (symbol-name symbol)))
    (cond ((null pkg) (concatenate 'string "#:" name))
          ((eq pkg (find-package "COMMON-LISP")) name)
          ((eq pkg (find-package "KEYWORD")) (concatenate 'string ":" name))
          (t (concatenate 'string (package-name pkg)
                          (if (eq (nth-value 1 (find-symbol name pkg)) :external) ":" "::")
                          name)))))

(defun name-text (name)
  "A class or type name (a symbol, normally) as text."
  (if (and name (symbolp name))
      (qualified-name name)
      (safe-string (lambda (s) (prin1 name s)) 200)))

(defvar *widetag-names* (make-array 256 :initial-element nil)
  "The name of the objects of each widetag (conses: the list lowtag), once seen.")

(defvar *wrapper-names* (make-hash-table :test 'eq :weakness :key :synchronized t)
  "Class name text per wrapper (layout) seen, kept while the wrapper lives.")

(defun wrapper-name (wrapper)
  (or (gethash wrapper *wrapper-names*)
      (setf (gethash wrapper *wrapper-names*)
            (handler-case (name-text (classoid-name (wrapper-classoid wrapper)))
              (serious-condition () "INSTANCE (class unknown)")))))

(defun element-type-text (type)
  (with-standard-io-syntax
    (let ((*package* (find-package "CL-USER")) (*print-pretty* nil) (*print-readably* nil))
      (prin1-to-string type))))

(defun widetag-name-of (widetag x)
  "The name of the objects of WIDETAG, from X, one of them."
  (cond ((= widetag (cons-typecode)) "CONS")
        ((= widetag (closure-widetag)) "CLOSURE")
        ((= widetag (code-widetag)) "CODE")
        ((symbolp x) "SYMBOL")
        ((simple-vector-p x) "SIMPLE-VECTOR")
        ((typep x '(simple-array character (*))) "SIMPLE-CHARACTER-STRING")
        ((typep x 'simple-base-string) "SIMPLE-BASE-STRING")
        ((typep x 'simple-bit-vector) "SIMPLE-BIT-VECTOR")
        ((typep x '(simple-array * (*)))
         (format nil "(SIMPLE-ARRAY ~a (*))" (element-type-text (array-element-type x))))
        ;; array headers: the data vector is a separate object, counted under its own type
        ((typep x 'simple-array) "(AND SIMPLE-ARRAY (NOT VECTOR))")
        ((typep x '(and string (not base-string))) "(AND STRING (NOT SIMPLE-ARRAY))")
        ((typep x 'base-string) "(AND BASE-STRING (NOT SIMPLE-ARRAY))")
        ((typep x 'bit-vector) "(AND BIT-VECTOR (NOT SIMPLE-ARRAY))")
        ((vectorp x) "(AND VECTOR (NOT SIMPLE-ARRAY))")
        ((arrayp x) "(AND ARRAY (NOT SIMPLE-ARRAY))")
        (t (let ((name (handler-case (classoid-name (classoid-of x))
                         (serious-condition () nil))))
             (if (and name (symbolp name) (not (eq name t)))
                 (qualified-name name)
                 (format nil "WIDETAG-~2,'0x" widetag))))))

(defun note-widetag-name (widetag x)
  (when (and (<= 0 widetag 255) (null (svref *widetag-names* widetag)))
    (setf (svref *widetag-names* widetag) (widetag-name-of widetag x))))

(defun seed-widetag-names ()
  "Name the widetags of common objects now, so that :heap-retainers knows their names before
any histogram saw them."
  (dolist (x (list* (list 1) 'seed "s" (coerce "s" 'simple-base-string) (vector 1)
                    (make-array 1 :element-type 'bit) (expt 2 100) 1d0 1/2 #c(1 2) #c(1d0 2d0)
                    (sb-ext:make-weak-pointer 1) (let ((y (list 1))) (lambda () y))
                    (make-array 2 :adjustable t) (make-array '(2 2))
                    (make-array 2 :fill-pointer 0 :element-type 'character)
                    (make-hash-table)
                    (mapcar (lambda (type) (make-array 1 :element-type type))
                            '((unsigned-byte 2) (unsigned-byte 4) (unsigned-byte 7)
                              (unsigned-byte 8) (unsigned-byte 15) (unsigned-byte 16)
                              (unsigned-byte 31) (unsigned-byte 32) (unsigned-byte 62)
                              (unsigned-byte 63) (unsigned-byte 64) (signed-byte 8)
                              (signed-byte 16) (signed-byte 32) fixnum (signed-byte 64)
                              single-float double-float (complex single-float)
                              (complex double-float)))))
    (let ((widetag (if (consp x) (cons-typecode) (widetag-of x))))
      (unless (or (= widetag (instance-widetag)) (= widetag (funcallable-instance-widetag)))
        (note-widetag-name widetag x)))))

(handler-case (seed-widetag-names)
  (serious-condition () nil))

;;;; ------------------------------------------------------------------------
;;;; The walk
;;;;
;;;; SB-VM::WALK-DYNAMIC-SPACE (what SB-VM:MAP-ALLOCATED-OBJECTS uses for the dynamic
;;;; space) under WITHOUT-GCING, as ROOM does.  It reads the GC page table, so a generation
;;;; mask restricts the walk to the pages of one generation at no cost.  The visitor conses
;;;; nothing: counts per widetag in fixed arrays, and per wrapper in an open-addressing table
;;;; of +wrapper-slots+ entries allocated before the walk (classes beyond 3/4 of it are
;;;; counted together).  Objects in other threads' open allocation regions are not visited
;;;; (SBCL's page table does not cover them yet); objects allocated since the last
;;;; collection are counted even if they are already garbage (no collection is forced).

(defconstant +wrapper-slots+ 8192)
(defconstant +wrapper-limit+ 6144)
(defconstant +deadline-check-mask+ #xfff)

;; tally indices
(defconstant +t-objects+ 0)
(defconstant +t-bytes+ 1)
(defconstant +t-wrappers+ 2)
(defconstant +t-overflow-count+ 3)
(defconstant +t-overflow-bytes+ 4)
(defconstant +t-found+ 5)

(defstruct (walk (:constructor make-walk ()))
  (tally (make-array 8 :element-type 'fixnum :initial-element 0)
   :type (simple-array fixnum (8)))
  (counts (make-array 256 :element-type 'fixnum :initial-element 0)
   :type (simple-array fixnum (256)))
  (bytes (make-array 256 :element-type 'fixnum :initial-element 0)
   :type (simple-array fixnum (256)))
  (samples (make-array 256 :initial-element nil) :type simple-vector)
  (keys (make-array +wrapper-slots+ :initial-element 0) :type simple-vector)
  (wcounts (make-array +wrapper-slots+ :element-type 'fixnum :initial-element 0)
   :type (simple-array fixnum (*)))
  (wbytes (make-array +wrapper-slots+ :element-type 'fixnum :initial-element 0)
   :type (simple-array fixnum (*)))
  (truncated nil)
  (seconds 0d0 :type double-float))

(sb-ext:defglobal **heap-walk-busy** (vector nil)
  "Slot 0 is the thread walking the heap, if any (one walk at a time per image).")

(defmacro with-heap-walk-slot (() &body body)
  `(let ((self sb-thread:*current-thread*))
     (unless (null (sb-ext:compare-and-swap (svref **heap-walk-busy** 0) nil self))
       (fail "BUSY" "another heap walk is running in this image; try again when it ends"))
     (unwind-protect (progn ,@body)
       (setf (svref **heap-walk-busy** 0) nil))))

(defun generation-mask (generation)
  (if generation (ash 1 generation) #b1111111))

(defun check-heap-limit (max-heap-bytes op)
  (let ((used (heap-used)))
    (when (> used max-heap-bytes)
      (fail "REFUSED" "~(~s~) refused: the heap in use (~,1f MiB) exceeds the walk limit of ~
                       ~,1f MiB (:max-heap-bytes ~d); raise the limit to walk this heap"
            op (/ used 1048576d0) (/ max-heap-bytes 1048576d0) max-heap-bytes))
    used))

(defun count-heap (generation max-seconds)
  "Walk the dynamic space (one GENERATION, or all when NIL) and count every object by
widetag and, for instances, by wrapper.  Stops at MAX-SECONDS (WALK-TRUNCATED set)."
  (let* ((walk (make-walk))
         (tally (walk-tally walk)) (counts (walk-counts walk)) (bytes (walk-bytes walk))
         (samples (walk-samples walk)) (keys (walk-keys walk))
         (wcounts (walk-wcounts walk)) (wbytes (walk-wbytes walk))
         (iwt (instance-widetag)) (fiwt (funcallable-instance-widetag))
         (filler (filler-widetag))
         (mask (1- +wrapper-slots+))
         (t0 (mono-ns))
         (deadline (+ t0 (round (* max-seconds 1d9)))))
    (declare (type fixnum iwt fiwt filler mask deadline)
             (type (simple-array fixnum (*)) wcounts wbytes))
    (flet ((visit (obj widetag size)
             (declare (type fixnum widetag size) (optimize speed (safety 0)))
             (unless (= widetag filler)
               (let ((n (incf (aref tally +t-objects+))))
                 (declare (type fixnum n))
                 (incf (aref tally +t-bytes+) size)
                 (when (and (zerop (logand n +deadline-check-mask+)) (> (mono-ns) deadline))
                   (throw 'heap-walk-deadline t)))
               (if (or (= widetag iwt) (= widetag fiwt))
                   (let* ((w (object-wrapper obj))
                          (h (logand (ash (the fixnum (object-address w)) -4) mask)))
                     (declare (type fixnum h))
                     (loop
                       (let ((k (svref keys h)))
                         (cond ((eq k w)
                                (incf (aref wcounts h))
                                (incf (aref wbytes h) size)
                                (return))
                               ((eql k 0)
                                (cond ((< (aref tally +t-wrappers+) +wrapper-limit+)
                                       (setf (svref keys h) w)
                                       (incf (aref tally +t-wrappers+))
                                       (setf (aref wcounts h) 1 (aref wbytes h) size))
                                      (t (incf (aref tally +t-overflow-count+))
                                         (incf (aref tally +t-overflow-bytes+) size)))
                                (return))
                               (t (setf h (logand (1+ h) mask)))))))
                   (progn
                     (incf (aref counts widetag))
                     (incf (aref bytes widetag) size)
                     (when (null (svref samples widetag))
                       (setf (svref samples widetag) obj)))))))
      (declare (dynamic-extent #'visit))
      (setf (walk-truncated walk)
            (catch 'heap-walk-deadline
              (without-gcing*
                (walk-dynamic-space #'visit (generation-mask generation) 0 0))
              nil)))
    (setf (walk-seconds walk) (/ (- (mono-ns) t0) 1d9))
    walk))

;;;; ------------------------------------------------------------------------
;;;; Snapshots
;;;;
;;;; A snapshot is one walk's counts by type name: three parallel vectors (names, counts,
;;;; bytes), largest first.  At most +max-heap-snapshots+ are kept, newest first; a walk
;;;; cut short by its time budget is not kept.  Memory: a snapshot of N types holds 3
;;;; vectors of N words (24 N bytes; N is at most 256 + +wrapper-limit+ + 1 = 6401, so
;;;; 154 KiB at worst, 4 of them 615 KiB); the name strings are shared with the name caches.
;;;; A real image of ~1,500 types costs ~36 KiB per snapshot.

(defconstant +max-heap-snapshots+ 4)

(defstruct (heap-snapshot (:conc-name snap-))
  (id 0 :type fixnum)
  (generation nil)
  (time 0d0 :type double-float)
  (names #() :type simple-vector)
  (counts #() :type (simple-array fixnum (*)))
  (bytes #() :type (simple-array fixnum (*)))
  (objects 0 :type fixnum)
  (total 0 :type fixnum))

(defvar *heap-snapshots* '() "The kept snapshots, newest first.")
(defvar *heap-snapshot-counter* 0)
(defvar *heap-snapshots-lock* (sb-thread:make-mutex :name "sbmon-agent heap snapshots"))

(defun walk-to-snapshot (walk generation)
  "The counts of WALK merged by name (several wrappers of one class: redefinitions), sorted
by bytes, largest first, as an unnumbered snapshot."
  (let ((by-name (make-hash-table :test 'equal))
        (counts (walk-counts walk)) (bytes (walk-bytes walk)) (samples (walk-samples walk))
        (keys (walk-keys walk)) (wcounts (walk-wcounts walk)) (wbytes (walk-wbytes walk))
        (tally (walk-tally walk)))
    (flet ((add (name c b)
             (let ((entry (gethash name by-name)))
               (if entry
                   (progn (incf (car entry) c) (incf (cdr entry) b))
                   (setf (gethash name by-name) (cons c b))))))
      (dotimes (w 256)
        (when (plusp (aref counts w))
          (note-widetag-name w (svref samples w))
          (add (svref *widetag-names* w) (aref counts w) (aref bytes w))))
      (dotimes (h +wrapper-slots+)
        (let ((k (svref keys h)))
          (unless (eql k 0)
            (add (wrapper-name k) (aref wcounts h) (aref wbytes h)))))
      (when (plusp (aref tally +t-overflow-count+))
        (add "INSTANCE (classes beyond the walk's table)"
             (aref tally +t-overflow-count+) (aref tally +t-overflow-bytes+))))
    ;; let go of the objects the walk held as samples
    (fill samples nil)
    (let* ((rows (sort (loop for name being the hash-keys of by-name using (hash-value e)
                             collect (list name (car e) (cdr e)))
                       (lambda (a b) (or (> (third a) (third b))
                                         (and (= (third a) (third b))
                                              (string< (first a) (first b)))))))
           (n (length rows))
           (snap (make-heap-snapshot
                  :generation generation :time (now-epoch)
                  :names (make-array n)
                  :counts (make-array n :element-type 'fixnum)
                  :bytes (make-array n :element-type 'fixnum)
                  :objects (aref tally +t-objects+) :total (aref tally +t-bytes+))))
      (loop for (name c b) in rows
            for i from 0
            do (setf (svref (snap-names snap) i) name
                     (aref (snap-counts snap) i) c
                     (aref (snap-bytes snap) i) b))
      snap)))

(defun keep-snapshot (snap)
  (sb-thread:with-mutex (*heap-snapshots-lock*)
    (setf (snap-id snap) (incf *heap-snapshot-counter*))
    (push snap *heap-snapshots*)
    (when (> (length *heap-snapshots*) +max-heap-snapshots+)
      (setf *heap-snapshots* (subseq *heap-snapshots* 0 +max-heap-snapshots+)))
    (snap-id snap)))

(defun find-snapshot (id)
  (sb-thread:with-mutex (*heap-snapshots-lock*)
    (or (find id *heap-snapshots* :key #'snap-id)
        (fail "BAD-ARGUMENT" "no heap snapshot ~d: ~:[no snapshot was taken yet~;~:*the agent ~
                              keeps the last ~d, now ~{~d~^, ~}~]"
              id (and *heap-snapshots* +max-heap-snapshots+)
              (reverse (mapcar #'snap-id *heap-snapshots*))))))

;;;; ------------------------------------------------------------------------
;;;; :heap-histogram

(defconstant +default-max-heap-bytes+ (* 4 1024 1024 1024))
(defconstant +max-top+ 500)

(defun generation-arg (args op)
  (let ((g (getf args :generation)))
    (unless (or (null g) (and (integerp g) (<= 0 g 6)))
      (fail "BAD-ARGUMENT" ":generation must be an integer in 0..6 for ~(~s~), got ~a"
            op (show-arg g)))
    g))

(defun histogram-rows (snap top)
  (loop for i from 0 below (min top (length (snap-names snap)))
        collect (list :type (svref (snap-names snap) i)
                      :count (aref (snap-counts snap) i)
                      :bytes (aref (snap-bytes snap) i))))

(defun delta-rows (snap old top)
  "Rows of the types whose count or bytes changed from OLD to SNAP, growing first (by
bytes, then count); their number."
  (let ((before (make-hash-table :test 'equal)) (rows '()))
    (loop for i from 0 below (length (snap-names old))
          do (setf (gethash (svref (snap-names old) i) before) i))
    (loop for i from 0 below (length (snap-names snap))
          for name = (svref (snap-names snap) i)
          for j = (gethash name before)
          for c0 = (if j (aref (snap-counts old) j) 0)
          for b0 = (if j (aref (snap-bytes old) j) 0)
          for c = (aref (snap-counts snap) i)
          for b = (aref (snap-bytes snap) i)
          do (when j (remhash name before))
             (unless (and (= c c0) (= b b0))
               (push (list name c b (- c c0) (- b b0)) rows)))
    (loop for name being the hash-keys of before using (hash-value j)
          do (push (list name 0 0 (- (aref (snap-counts old) j)) (- (aref (snap-bytes old) j)))
                   rows))
    (let ((sorted (sort rows (lambda (a b) (or (> (fifth a) (fifth b))
                                               (and (= (fifth a) (fifth b))
                                                    (> (fourth a) (fourth b)))))))
          (n (length rows)))
      (values (loop for (name c b dc db) in sorted
                    for k from 0 below top
                    collect (list :type name :count c :bytes b :count-delta dc :bytes-delta db))
              n))))

(defun call-on-own-thread (name fn)
  "FN's value, computed on a thread of its own that ends before this returns.  A walk leaves
pointers to whatever it visited in dead slots of the stack it ran on, and a conservative
stack scan (a later SEARCH-ROOTS) reports them as roots.  So no walk runs on a thread that
outlives it, and the thread scrubs its dead stack before it ends: SBCL reuses the memory of
an ended thread's stack for the next thread, stale words and all."
  (let* ((box (vector nil))
         (thread (spawn name
                        (lambda ()
                          (setf (svref box 0)
                                (handler-case (list (funcall fn))
                                  (serious-condition (c) c)))
                          (scrub-control-stack)))))
    (sb-thread:join-thread thread :default nil)
    (let ((result (svref box 0)))
      (cond ((typep result 'condition) (error result))
            ((null result) (fail "ABORTED" "the heap walk's thread ended without a result"))
            (t (first result))))))

(defun op-heap-histogram (args)
  (check-plist args '(:top :since :generation :max-seconds :max-heap-bytes) :heap-histogram)
  (let* ((top (int-arg args :top :heap-histogram :default 30 :max +max-top+))
         (since (int-arg args :since :heap-histogram :default nil))
         (generation (generation-arg args :heap-histogram))
         (max-seconds (real-arg args :max-seconds :heap-histogram :default 10 :min 0.01d0 :max 300))
         (max-heap (int-arg args :max-heap-bytes :heap-histogram
                            :default +default-max-heap-bytes+))
         (old (and since (find-snapshot since))))
    (require-capability :heap-walk ":heap-histogram")
    (when (and old (not (eql (snap-generation old) generation)))
      (fail "BAD-ARGUMENT" "snapshot ~d covers ~:[every generation~;~:*generation ~d~], this ~
                            call ~:[every generation~;~:*generation ~d~]: compare like with like"
            since (snap-generation old) generation))
    (let* ((heap-used (check-heap-limit max-heap :heap-histogram))
           (walk (with-heap-walk-slot ()
                   (call-on-own-thread "sbmon-agent heap walk"
                                       (lambda () (count-heap generation max-seconds)))))
           (snap (walk-to-snapshot walk generation))
           (truncated (walk-truncated walk))
           (id (unless truncated (keep-snapshot snap)))
           (ntypes (length (snap-names snap))))
      (multiple-value-bind (rows nrows)
          (if (and old (not truncated))
              (delta-rows snap old top)
              (values (histogram-rows snap top) ntypes))
        (list :snapshot-id id
              :since (and old (not truncated) since)
              :generation generation
              :truncated (and truncated t)
              :seconds (walk-seconds walk)
              :heap-used heap-used
              :objects (snap-objects snap)
              :bytes (snap-total snap)
              :types ntypes
              :rows rows
              :rows-omitted (max 0 (- nrows (length rows)))
              :objects-delta (and old (not truncated) (- (snap-objects snap) (snap-objects old)))
              :bytes-delta (and old (not truncated) (- (snap-total snap) (snap-total old)))
              :snapshots (sb-thread:with-mutex (*heap-snapshots-lock*)
                           (reverse (mapcar #'snap-id *heap-snapshots*))))))))

;;;; ------------------------------------------------------------------------
;;;; :heap-retainers
;;;;
;;;; Sample up to :max-paths objects of the type by walking the heap (the first found), then
;;;; ask SB-EXT:SEARCH-ROOTS for a path to each, with collections held off (SEARCH-PATHS says
;;;; why not inside a full collection, :gc t).  The search stops every thread while it runs;
;;;; the reply reports its duration.

(defun type-matcher (type)
  "For TYPE (a name as :heap-histogram prints it): (values :widetag W) or (values :classoid C),
or a BAD-ARGUMENT error."
  (let ((w (position type *widetag-names* :test #'equal)))
    (when w (return-from type-matcher (values :widetag w))))
  (let* ((colon (position #\: type :from-end t))
         (start (and colon (position #\: type :end colon :from-end t :test-not #'char=)))
         (pkg-name (cond ((null colon) "COMMON-LISP")
                         ((null start) "KEYWORD")
                         (t (subseq type 0 (1+ start)))))
         (sym-name (if colon (subseq type (1+ colon)) type))
         (pkg (find-package pkg-name))
         (sym (and pkg (find-symbol sym-name pkg)))
         (classoid (and sym (handler-case (find-classoid sym) (serious-condition () nil))))
         (class (and sym (find-class sym nil))))
    ;; instances only: structures, standard objects, conditions (a built-in class such as
    ;; INTEGER has no instances of its own in the heap)
    (unless (and classoid class (not (typep class 'built-in-class)))
      (fail "BAD-ARGUMENT" "unknown type ~s: give a name as heap_histogram prints it (such as ~
                            \"CONS\", \"SIMPLE-VECTOR\" or a class name \"PACKAGE::NAME\")"
            (one-line type 200)))
    (values :classoid classoid)))

(defun sample-objects (kind key max max-seconds)
  "Up to MAX objects matching KIND/KEY (see TYPE-MATCHER), the first the walk finds, in a
vector; and whether the walk ran out of time."
  (let* ((found (make-array max :initial-element nil))
         (tally (make-array 8 :element-type 'fixnum :initial-element 0))
         (iwt (instance-widetag)) (fiwt (funcallable-instance-widetag))
         (want (if (eq kind :widetag) key -1))
         (classoid (if (eq kind :classoid) key nil))
         (t0 (mono-ns))
         (deadline (+ t0 (round (* max-seconds 1d9)))))
    (declare (type fixnum iwt fiwt want deadline))
    (flet ((visit (obj widetag size)
             (declare (type fixnum widetag) (ignore size) (optimize speed (safety 0)))
             (let ((n (incf (aref tally +t-objects+))))
               (declare (type fixnum n))
               (when (and (zerop (logand n +deadline-check-mask+)) (> (mono-ns) deadline))
                 (throw 'heap-walk-deadline t)))
             (when (if classoid
                       (and (or (= widetag iwt) (= widetag fiwt))
                            (eq (wrapper-classoid (object-wrapper obj)) classoid))
                       (= widetag want))
               (let ((i (aref tally +t-found+)))
                 (setf (svref found i) obj)
                 (when (= (incf (aref tally +t-found+)) max)
                   (throw 'heap-walk-deadline nil))))))
      (declare (dynamic-extent #'visit))
      (let ((late (catch 'heap-walk-deadline
                    (without-gcing* (walk-dynamic-space #'visit #b1111111 0 0))
                    nil)))
        (values (subseq found 0 (aref tally +t-found+)) late (/ (- (mono-ns) t0) 1d9))))))

(defun sample-weakly (kind key max max-seconds)
  "SAMPLE-OBJECTS on a thread of its own: only weak pointers come back, so no stack of the
agent's holds the samples.  Returns (POINTERS LATE SECONDS)."
  (call-on-own-thread
   "sbmon-agent heap sampler"
   (lambda ()
     (multiple-value-bind (objects late seconds) (sample-objects kind key max max-seconds)
       (list (map 'list #'sb-ext:make-weak-pointer objects) late seconds)))))

(defun object-type-name (x)
  (let ((widetag (if (consp x) (cons-typecode) (widetag-of x))))
    (if (or (= widetag (instance-widetag)) (= widetag (funcallable-instance-widetag)))
        (wrapper-name (object-wrapper x))
        (progn (note-widetag-name widetag x)
               (svref *widetag-names* widetag)))))

(defun structure-slot-name (x word)
  "The name of the slot of structure instance X at WORD (a word index), or NIL."
  (handler-case
      (let* ((dd (wrapper-info (object-wrapper x)))
             (index (- word (instance-slots-word)))
             (dsd (and dd (find index (dd-slots dd) :key #'dsd-index))))
        (and dsd (name-text (dsd-name dsd))))
    (serious-condition () nil)))

(defun via-text (x word)
  "How object X refers to the next object of a path, from the word index SEARCH-ROOTS gave."
  (cond ((consp x) (case word
                     (0 "car")
                     (1 "cdr")
                     (t (format nil "nthcdr ~d" word))))
        ((symbolp x) (if (= word (symbol-value-word)) "value" (format nil "word ~d" word)))
        ((simple-vector-p x) (format nil "element ~d" (- word (vector-data-word))))
        ((typep x 'structure-object)
         (let ((slot (structure-slot-name x word)))
           (if slot (format nil "slot ~a" slot) (format nil "word ~d" word))))
        (t (format nil "word ~d" word))))

(defun step-plist (x word)
  (list* :type (handler-case (object-type-name x) (serious-condition () "?"))
         :via (via-text x word)
         :generation (handler-case (object-generation x) (serious-condition () nil))
         (when (symbolp x) (list :symbol (qualified-name x)))))

(defun root-plist (root)
  (flet ((thread-text (th)
           (if (typep th 'sb-thread:thread)
               (object-name-string (sb-thread:thread-name th))
               (object-name-string th))))
    (cond ((eq root :static) (list :kind "static"))
          ((eq root :pinned) (list :kind "pinned"))
          ((and (consp root) (symbolp (second root)))
           (list :kind "thread-binding" :thread (thread-text (first root))
                 :symbol (qualified-name (second root)) :current (and (third root) t)))
          ((consp root) (list :kind "thread-stack" :thread (thread-text (first root))))
          (t (list :kind "unknown")))))

(defun sbcl-symbol-p (symbol)
  "True when SYMBOL belongs to one of SBCL's own packages (SB-KERNEL, SB-IMPL, ...)."
  (let ((p (symbol-package symbol)))
    (and p (let ((name (package-name p)))
             (and (> (length name) 3) (string= "SB-" name :end2 3))))))

(defun path-plist (path max-depth)
  (destructuring-bind (target root &rest nodes) path
    (let* ((depth (length nodes))
           (kept (if (> depth max-depth) (last nodes max-depth) nodes))
           ;; SBCL's own caches (its ctype-of cache, for one) can hold a symbol of the
           ;; program, and the search then goes through them: the first global that is not
           ;; SBCL's names what keeps the object alive
           (globals (loop for (obj . word) in nodes
                          when (and (symbolp obj) (= word (symbol-value-word)))
                            collect obj))
           (global (let ((g (or (find-if-not #'sbcl-symbol-p globals) (first globals))))
                     (and g (qualified-name g)))))
      (list :target (object-type-name target)
            :root (root-plist root)
            :global global
            :depth depth
            :steps-omitted (- depth (length kept))
            :steps (loop for (obj . word) in kept collect (step-plist obj word))))))

(defconstant +search-attempts+ 4)

(defun search-paths (pointers)
  "SEARCH-ROOTS' paths to the objects of weak POINTERS, each as (TARGET ROOT NODE*).
Not with :GC T: inside a collection, the collector's own frames on the searching thread's
stack are scanned as roots, and the path found often starts there.  Outside one, a
collection another thread makes during the search spoils it, so collections are held off
while it runs, as for a walk.  Even so, on SBCL 2.2.9 a search right after new weak pointers
are made finds nothing about every other time, and the same search again finds the paths,
so the objects still without one are searched again, up to +SEARCH-ATTEMPTS+ times.  On a
thread of its own, so no later search meets its stale frames."
  (call-on-own-thread
   "sbmon-agent heap search"
   (lambda ()
     (let ((found '()))
       (dotimes (i +search-attempts+)
         (let ((missing (remove-if (lambda (wp)
                                     (let ((x (sb-ext:weak-pointer-value wp)))
                                       (or (null x) (find x found :key #'first))))
                                   pointers)))
           (when (null missing)
             (return))
           (dolist (path (without-gcing*
                           (funcall (search-roots-name) missing
                                    :criterion :oldest :gc nil :print nil)))
             (push path found))))
       (nreverse found)))))

(defun op-heap-retainers (args)
  (check-plist args '(:type :max-paths :max-depth :max-seconds :max-heap-bytes) :heap-retainers)
  (let* ((type (string-arg args :type :heap-retainers :required t :max 300))
         (max-paths (int-arg args :max-paths :heap-retainers :default 3 :max 10))
         (max-depth (int-arg args :max-depth :heap-retainers :default 20 :max 1000))
         (max-seconds (real-arg args :max-seconds :heap-retainers :default 10 :min 0.01d0 :max 300))
         (max-heap (int-arg args :max-heap-bytes :heap-retainers
                            :default +default-max-heap-bytes+)))
    (require-capability :heap-walk ":heap-retainers")
    (require-capability :heap-retainers ":heap-retainers (SB-EXT:SEARCH-ROOTS)")
    (multiple-value-bind (kind key) (type-matcher type)
      (check-heap-limit max-heap :heap-retainers)
      (destructuring-bind (pointers late walk-seconds)
          (with-heap-walk-slot () (sample-weakly kind key max-paths max-seconds))
        (let* ((t0 (mono-ns))
               (paths (when pointers (search-paths pointers)))
               (search-seconds (seconds-since t0)))
          (list :type type
                :sampled (length pointers)
                :walk-seconds walk-seconds
                :walk-truncated (and late t)
                :search-seconds search-seconds
                :paths (loop for path in paths
                             collect (path-plist path max-depth))))))))

(note-part-loaded :heap)
